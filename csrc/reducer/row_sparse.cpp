#include "reducer/row_sparse.hpp"

#include <cstring>

#include <ATen/Parallel.h>

namespace torchlane {

namespace {

bool row_has_nonzero_bits(const unsigned char* row, int64_t bytes) {
  int64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, row + i, 8);
    if (word != 0) {
      return true;
    }
  }
  for (; i < bytes; ++i) {
    if (row[i] != 0) {
      return true;
    }
  }
  return false;
}

}  // namespace

at::Tensor dense_rows_to_sparse(const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() >= 1, "dense_rows_to_sparse: the gradient needs a dimension of rows");
  at::Tensor rows;
  if (grad.device().is_cpu() && grad.is_contiguous()) {
    const int64_t n = grad.size(0);
    const int64_t row_bytes = n == 0 ? 0 : static_cast<int64_t>(grad.nbytes()) / n;
    auto mask = at::empty({n}, grad.options().dtype(at::kBool).requires_grad(false));
    auto* flags = mask.data_ptr<bool>();
    const auto* base = static_cast<const unsigned char*>(grad.const_data_ptr());
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        flags[r] = row_has_nonzero_bits(base + r * row_bytes, row_bytes);
      }
    });
    rows = mask.nonzero().squeeze(1);
  } else {
    auto nonzero = grad.ne(0);
    rows = (grad.dim() == 1 ? nonzero : nonzero.flatten(1).any(1)).nonzero().squeeze(1);
  }
  auto sparse =
      at::_sparse_coo_tensor_unsafe(rows.unsqueeze(0), grad.index_select(0, rows), grad.sizes());
  sparse._coalesced_(true);  // rows are unique and ascending
  return sparse;
}

}  // namespace torchlane
