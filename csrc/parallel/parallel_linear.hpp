#pragma once
// The column-parallel linear layer as one autograd function, so that its backward can overlap the
// input-gradient collective with the weight-gradient matmul. See Note [Overlapped column backward].
#include "parallel/region_comm.hpp"

namespace torchlane::parallel {

// Note [Overlapped column backward]
// A column-parallel linear Y_i = X W_i^T + b_i (W_i: this rank's rows of W, i.e. its output
// columns) enters the region with copy_to_region (or, with sequence parallelism, with
// gather_from_sequence_region along `seq_dim`). Its backward needs
//   dX = sum_i dY_i W_i              (all-reduce; reduce-scatter along seq_dim with SP)
//   dW_i = dY_i^T X,  db_i = sum dY_i  (local)
// and the two are independent, so the collective on dX is launched first and the weight-gradient
// matmul runs while it is in flight (Megatron-LM's async gradient all-reduce); the function waits
// for it before returning. With sequence parallelism X is this rank's sequence chunk; the full
// input the matmul needs is gathered in the forward and gathered again in the backward rather
// than saved, so the layer keeps only its 1/tp chunk alive between the passes.
at::Tensor column_parallel_linear(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias, const ProcessGroupPtr& pg,
                                  bool sequence_parallel, int64_t seq_dim);

}  // namespace torchlane::parallel
