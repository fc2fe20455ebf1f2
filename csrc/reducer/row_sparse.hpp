#pragma once

#include <ATen/ATen.h>

namespace torchlane {

// Note [Row-sparse detection]
// row_sparse_params (Note [Sparse gradients]) needs the rows of a dense gradient that hold any
// nonzero, once per step, over a table that may be hundreds of MB. to_sparse(1) and
// ne(0).any(1) materialise a full-size mask first; for a contiguous CPU gradient this scans each
// row's bytes in place instead (at::parallel_for over rows, stopping at the first nonzero word),
// so the pass costs about one read of the table. A row whose only nonzero bits are -0.0 counts as
// touched: it is sent, which costs bytes but not correctness. Other devices and layouts use
// ne(0).any(1).
//
// Returns a coalesced sparse COO tensor with sparse_dim 1: the touched rows' indices and values.
at::Tensor dense_rows_to_sparse(const at::Tensor& grad);

}  // namespace torchlane
