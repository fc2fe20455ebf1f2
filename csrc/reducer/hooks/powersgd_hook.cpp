#include "reducer/hooks/powersgd_hook.hpp"

#include <cmath>
#include <map>
#include <utility>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

namespace torchlane::hooks {

// Note [PowerSGD]
// Vogels, Karimireddy & Jaggi 2019, one power iteration per step, with the semantics of torch's
// powerSGD_hook so that a model trained with either follows the same trajectory:
//  * Before `start_iter` steps the bucket is plainly all-reduced (divided by world size first).
//    The step counter advances when the last bucket of a step is seen.
//  * Each gradient is viewed as a (shape[0], numel / shape[0]) matrix M. It is compressed when
//    (rows + cols) * r * min_compression_rate < rows * cols (r = min(rank, rows, cols)); 0-/1-D
//    tensors and the others are all-reduced uncompressed, packed together.
//  * Error feedback: M += e before compression; after the step e = M - (this rank's result),
//    taken over the whole bucket (for the uncompressed part that is local minus mean, which sums
//    to zero over ranks and leaves the mean unchanged - as torch does).
//  * Q is drawn from N(0, 1) and orthogonalised the first time (every time without warm start),
//    seeded as torch does (numpy RandomState(seed).randint(1e9) -> CPU generator -> randn, matrices
//    grouped by shape in order of first appearance); with warm start the previous step's Q is
//    re-orthogonalised and reused.
//  * P = M Q; all-reduce(sum) P; orthogonalise P; Q = M^T P; all-reduce Q and divide by world
//    size; M <- P Q^T.
// Two differences from torch's hook, neither changing the result beyond rounding: we always
// orthogonalise by Gram-Schmidt (torch uses Householder QR for rank > 2, which differs only in the
// signs of columns of P and Q, and P Q^T is invariant to those), and we all-reduce the uncompressed
// tensors and P in one collective instead of two. 1-D tensors are never compressed (torch would
// compress an n x 1 "matrix" when min_compression_rate < 1 + 1/n, which saves nothing).
//
// The two dependent all-reduces run inside runHook on the calling thread (it waits for them):
// collectives issued from completion callbacks could interleave differently with the next
// bucket's on different ranks. The bf16/fp16 and top-k hooks, one collective each, stay async.

bool powersgd_should_compress(int64_t rows, int64_t cols, int64_t rank,
                              double min_compression_rate) {
  const double uncompressed = static_cast<double>(rows) * static_cast<double>(cols);
  const double compressed = static_cast<double>(rows + cols) * static_cast<double>(rank);
  return compressed * min_compression_rate < uncompressed;
}

PowerSGDPlan powersgd_plan(const std::vector<std::vector<int64_t>>& shapes, int64_t rank,
                           double min_compression_rate) {
  TORCH_CHECK_VALUE(rank >= 1, "powersgd: matrix approximation rank must be >= 1, got ", rank);
  PowerSGDPlan plan;
  // (rows, cols) -> tensors of that matrix shape, in order of first appearance.
  std::vector<std::pair<std::pair<int64_t, int64_t>, std::vector<int64_t>>> groups;
  for (size_t t = 0; t < shapes.size(); ++t) {
    const auto& shape = shapes[t];
    int64_t numel = 1;
    for (auto s : shape) {
      numel *= s;
    }
    const int64_t rows = shape.empty() ? 1 : shape[0];
    const int64_t cols = rows == 0 ? 0 : numel / rows;
    const int64_t r = std::min({rank, rows, cols});
    plan.numel_before += numel;
    if (shape.size() >= 2 && r >= 1 &&
        powersgd_should_compress(rows, cols, r, min_compression_rate)) {
      plan.numel_after += (rows + cols) * r;
      auto key = std::make_pair(rows, cols);
      auto it = std::find_if(groups.begin(), groups.end(),
                             [&](const auto& g) { return g.first == key; });
      if (it == groups.end()) {
        groups.push_back({key, {}});
        it = std::prev(groups.end());
      }
      it->second.push_back(static_cast<int64_t>(t));
    } else {
      plan.numel_after += numel;
      plan.uncompressed.push_back(static_cast<int64_t>(t));
      plan.uncompressed_numel += numel;
    }
  }
  for (const auto& [shape, tensors] : groups) {
    const auto [rows, cols] = shape;
    const int64_t r = std::min({rank, rows, cols});
    for (auto t : tensors) {
      plan.compressed.push_back({t, rows, cols, r, plan.p_numel, plan.q_numel});
      plan.p_numel += rows * r;
      plan.q_numel += cols * r;
    }
  }
  return plan;
}

namespace {

// Modified Gram-Schmidt on the columns of a row-major rows x cols matrix. The dot products of
// column i with all later columns are accumulated in one sweep over the rows, so the inner loop
// runs along a contiguous row; sums are accumulated in double.
template <typename T>
void gram_schmidt_cpu(T* m, int64_t rows, int64_t cols, int64_t row_stride, double epsilon) {
  std::vector<double> dots(cols);
  for (int64_t i = 0; i < cols; ++i) {
    double sq = 0;
    for (int64_t j = 0; j < rows; ++j) {
      const double v = m[j * row_stride + i];
      sq += v * v;
    }
    const T norm = static_cast<T>(std::sqrt(sq) + epsilon);
    for (int64_t j = 0; j < rows; ++j) {
      T& v = m[j * row_stride + i];
      v = norm > 0 ? v / norm : T(0);
    }
    if (i + 1 == cols) {
      break;
    }
    std::fill(dots.begin() + i + 1, dots.end(), 0.0);
    for (int64_t j = 0; j < rows; ++j) {
      const T* row = m + j * row_stride;
      const double c = row[i];
      for (int64_t k = i + 1; k < cols; ++k) {
        dots[k] += c * row[k];
      }
    }
    for (int64_t j = 0; j < rows; ++j) {
      T* row = m + j * row_stride;
      const T c = row[i];
      for (int64_t k = i + 1; k < cols; ++k) {
        row[k] -= static_cast<T>(dots[k]) * c;
      }
    }
  }
}

// Device-generic version (CUDA): the same steps as tensor ops.
void gram_schmidt_generic(at::Tensor& m, double epsilon) {
  const int64_t cols = m.size(1);
  for (int64_t i = 0; i < cols; ++i) {
    at::Tensor col = m.narrow(1, i, 1);
    at::Tensor norm = at::linalg_vector_norm(col, 2, {0}, true) + epsilon;
    col.div_(at::where(norm > 0, norm, at::ones_like(norm))).mul_(norm > 0);
    if (i + 1 < cols) {
      at::Tensor rest = m.narrow(1, i + 1, cols - i - 1);
      rest.sub_((col * rest).sum(0, true) * col);
    }
  }
}

}  // namespace

void orthogonalize_(at::Tensor& matrix, double epsilon) {
  TORCH_CHECK(matrix.dim() == 2, "orthogonalize_: matrix must be 2-D, got shape ", matrix.sizes());
  TORCH_CHECK(matrix.scalar_type() == at::kFloat || matrix.scalar_type() == at::kDouble,
              "orthogonalize_: matrix must be float32 or float64, got ", matrix.scalar_type());
  TORCH_CHECK(epsilon >= 0, "orthogonalize_: epsilon must be >= 0, got ", epsilon);
  if (matrix.is_cpu() && matrix.stride(1) == 1) {
    AT_DISPATCH_FLOATING_TYPES(matrix.scalar_type(), "orthogonalize_", [&] {
      gram_schmidt_cpu(matrix.mutable_data_ptr<scalar_t>(), matrix.size(0), matrix.size(1),
                       matrix.stride(0), epsilon);
    });
    return;
  }
  gram_schmidt_generic(matrix, epsilon);
}

uint32_t PowerSGDSeeds::next() {
  // numpy's legacy bounded integers: mask the 32-bit draw to 30 bits, reject values >= 1e9.
  constexpr uint32_t kMask = (1u << 30) - 1;
  uint32_t v = 0;
  do {
    v = static_cast<uint32_t>(engine_()) & kMask;
  } while (v > 999'999'999u);
  return v;
}

PowerSGDHook::PowerSGDHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                           PowerSGDOptions options)
    : CommHook(std::move(process_group)), options_(options), seeds_(options.seed) {
  TORCH_CHECK(process_group_, "PowerSGDHook: process_group must not be None");
  TORCH_CHECK_VALUE(options.rank >= 1, "PowerSGDHook: rank must be >= 1, got ", options.rank);
  TORCH_CHECK_VALUE(options.start_iter >= 0, "PowerSGDHook: start_powerSGD_iter must be >= 0, got ",
              options.start_iter);
  TORCH_CHECK_VALUE(!(options.use_error_feedback || options.warm_start) || options.start_iter > 1,
              "PowerSGDHook: start_powerSGD_iter must be > 1 when use_error_feedback or "
              "warm_start is enabled, got ",
              options.start_iter);
  TORCH_CHECK_VALUE(options.min_compression_rate >= 0,
              "PowerSGDHook: min_compression_rate must be >= 0, got ",
              options.min_compression_rate);
  TORCH_CHECK_VALUE(options.epsilon >= 0, "PowerSGDHook: orthogonalization_epsilon must be >= 0, got ",
              options.epsilon);
}

int64_t PowerSGDHook::iter() const {
  std::lock_guard<std::mutex> guard(mutex_);
  return iter_;
}

std::tuple<double, int64_t, int64_t> PowerSGDHook::compression_stats() const {
  std::lock_guard<std::mutex> guard(mutex_);
  const double rate = numel_after_ > 0 ? static_cast<double>(numel_before_) / numel_after_ : 0.0;
  return {rate, numel_before_, numel_after_};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> PowerSGDHook::memory(int64_t bucket_index) const {
  std::lock_guard<std::mutex> guard(mutex_);
  auto it = memory_.find(bucket_index);
  if (it == memory_.end()) {
    return {};
  }
  return {it->second.p, it->second.q, it->second.error};
}

void PowerSGDHook::maybe_increase_iter(const c10d::GradBucket& bucket) {
  if (bucket.isLast()) {
    ++iter_;
  }
}

c10::intrusive_ptr<c10::ivalue::Future> PowerSGDHook::allreduce_mean(at::Tensor buffer) {
  buffer.div_(process_group_->getSize());
  count_bytes_sent(buffer.numel() * static_cast<int64_t>(buffer.element_size()));
  std::vector<at::Tensor> tensors{buffer};
  return process_group_->allreduce(tensors)->getFuture()->then(
      [buffer](c10::ivalue::Future& done) {
        done.value();  // rethrows a communication error
        return c10::IValue(buffer);
      },
      c10::TensorType::get());
}

c10::intrusive_ptr<c10::ivalue::Future> PowerSGDHook::runHook(c10d::GradBucket& bucket) {
  std::lock_guard<std::mutex> guard(mutex_);
  at::Tensor buffer = bucket.getBufferRef();
  if (iter_ < options_.start_iter) {
    maybe_increase_iter(bucket);
    return allreduce_mean(buffer);
  }
  TORCH_CHECK(buffer.scalar_type() == at::kFloat || buffer.scalar_type() == at::kDouble,
              "powersgd hook: the bucket buffer must be float32 or float64, got ",
              buffer.scalar_type());
  const auto index = static_cast<int64_t>(bucket.getIndex());
  const int64_t world = process_group_->getSize();
  const int64_t n = buffer.numel();
  BucketMemory& mem = memory_[index];

  at::Tensor before;  // the error-corrected local gradient
  if (options_.use_error_feedback) {
    if (mem.error.defined() && mem.error.numel() == n) {
      buffer.add_(mem.error);
    } else {
      mem.error = at::zeros({n}, buffer.options());
    }
    before = buffer.clone();
  }

  const std::vector<at::Tensor> grads = bucket.getGradients();
  std::vector<std::vector<int64_t>> shapes;
  shapes.reserve(grads.size());
  for (const auto& g : grads) {
    shapes.emplace_back(g.sizes().vec());
  }
  const PowerSGDPlan plan = powersgd_plan(shapes, options_.rank, options_.min_compression_rate);
  numel_before_ += plan.numel_before;
  numel_after_ += plan.numel_after;

  const bool randomize = !options_.warm_start || !mem.p.defined() ||
                         mem.p.numel() != plan.p_numel || mem.q.numel() != plan.q_numel;
  if (randomize) {
    mem.p = at::empty({plan.p_numel}, buffer.options());
    mem.q = at::empty({plan.q_numel}, buffer.options());
  }
  std::vector<at::Tensor> ms, ps, qs;
  for (const auto& c : plan.compressed) {
    ms.push_back(grads[c.tensor].view({c.rows, c.cols}));
    ps.push_back(mem.p.narrow(0, c.p_offset, c.rows * c.rank).view({c.rows, c.rank}));
    qs.push_back(mem.q.narrow(0, c.q_offset, c.cols * c.rank).view({c.cols, c.rank}));
  }
  if (randomize && !qs.empty()) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seeds_.next());
    for (auto& q : qs) {
      q.copy_(at::randn({1, q.size(0), q.size(1)}, gen, at::TensorOptions().dtype(q.dtype()))
                  .view_as(q));
    }
  }
  for (auto& q : qs) {
    orthogonalize_(q, options_.epsilon);
  }
  for (size_t i = 0; i < ms.size(); ++i) {
    at::mm_out(ps[i], ms[i], qs[i]);
  }

  // One all-reduce for the uncompressed tensors and P together.
  std::vector<at::Tensor> first_parts;
  for (auto t : plan.uncompressed) {
    first_parts.push_back(grads[t].reshape({-1}));
  }
  first_parts.push_back(mem.p);
  std::vector<at::Tensor> first{at::cat(first_parts)};
  count_bytes_sent(first[0].numel() * static_cast<int64_t>(first[0].element_size()) +
                   plan.q_numel * static_cast<int64_t>(mem.q.element_size()));
  process_group_->allreduce(first)->wait();
  int64_t offset = 0;
  for (auto t : plan.uncompressed) {
    at::Tensor g = grads[t];
    g.copy_(first[0].narrow(0, offset, g.numel()).view_as(g)).div_(world);
    offset += g.numel();
  }
  mem.p.copy_(first[0].narrow(0, offset, plan.p_numel));

  for (auto& p : ps) {
    orthogonalize_(p, options_.epsilon);
  }
  for (size_t i = 0; i < ms.size(); ++i) {
    at::mm_out(qs[i], ms[i].t(), ps[i]);
  }
  std::vector<at::Tensor> second{mem.q};
  process_group_->allreduce(second)->wait();
  mem.q.div_(world);
  for (size_t i = 0; i < ms.size(); ++i) {
    at::mm_out(ms[i], ps[i], qs[i].t());
  }

  if (options_.use_error_feedback) {
    mem.error = before.sub_(buffer);
  }
  if (!options_.warm_start) {
    mem.p = at::Tensor();
    mem.q = at::Tensor();
  }
  maybe_increase_iter(bucket);

  auto done = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get());
  done->markCompleted(c10::IValue(buffer));
  return done;
}

// ---- op: torchlane::orthogonalize_ (schema in bindings.cpp) ----

namespace {

void orthogonalize_op(at::Tensor& matrix, double epsilon) {
  orthogonalize_(matrix, epsilon);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlane, CPU, m) {
  m.impl("orthogonalize_", &orthogonalize_op);
}

#ifdef TORCHLANE_WITH_CUDA
TORCH_LIBRARY_IMPL(torchlane, CUDA, m) {
  m.impl("orthogonalize_", &orthogonalize_op);
}
#endif

}  // namespace torchlane::hooks
