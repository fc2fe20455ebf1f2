#include "hooks/powersgd_hook.hpp"

#include <ATen/record_function.h>
#include "comm/clock.hpp"
#include "comm/kept_works.hpp"
#include "hooks/float_types.hpp"

#include <chrono>
#include <cmath>
#include <exception>
#include <map>
#include <stdexcept>
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
// The two dependent all-reduces are pipelined across buckets and all issued from runHook on the
// calling thread (Note [PowerSGD pipeline]); the bf16/fp16 and top-k hooks have one collective
// each and launch it at once.

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
      auto it =
          std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
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
  RECORD_FUNCTION("torchlane::powersgd_orthogonalize", std::vector<c10::IValue>({matrix}));
  TORCH_CHECK(matrix.dim() == 2, "orthogonalize_: matrix must be 2-D, got shape ", matrix.sizes());
  TORCH_CHECK(is_float_or_double(matrix), "orthogonalize_: matrix must be float32 or float64, got ",
              matrix.scalar_type());
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

namespace {

using comm::now_ns;

// The compressed matrices of a bucket as views: M (rows x cols) of the bucket's gradients, P
// (rows x r) of the flat `p`, Q (cols x r) of the flat `q`, in plan order.
struct MatrixViews {
  std::vector<at::Tensor> m, p, q;
};

MatrixViews matrix_views(const PowerSGDPlan& plan, const std::vector<at::Tensor>& grads,
                         const at::Tensor& p, const at::Tensor& q) {
  MatrixViews v;
  for (const auto& c : plan.compressed) {
    v.m.push_back(grads[c.tensor].view({c.rows, c.cols}));
    v.p.push_back(p.narrow(0, c.p_offset, c.rows * c.rank).view({c.rows, c.rank}));
    v.q.push_back(q.narrow(0, c.q_offset, c.cols * c.rank).view({c.cols, c.rank}));
  }
  return v;
}

}  // namespace

// Note [PowerSGD pipeline]
// A compressed bucket needs two dependent all-reduces: P = M Q (sent with the uncompressed
// tensors), then Q = M^T orth(P). Waiting for the first inside runHook would block the backward
// pass for a round trip per bucket; launching the second from the first's completion callback,
// as torch's hook does, would let ranks issue collectives in different orders once several
// buckets are in flight (Gloo runs callbacks on its worker threads, and ProcessGroupGloo matches
// collectives by issue order). So both are issued from runHook, on the backward thread, in an
// order fixed by the bucket order alone:
//  * runHook(i) launches bucket i's first all-reduce and returns a future of its own. Then it
//    advances the buckets launched before i (held in pending_): waits for their first all-reduce
//    (by now usually done: it ran while the gradients of bucket i were computed), orthogonalises
//    P, computes Q and launches the second all-reduce. Collectives: P0, P1 Q0, P2 Q1, ...
//  * The last bucket (GradBucket::isLast) also advances itself, so when its runHook returns every
//    collective of the step is issued and every future will complete without further calls
//    (Note [Comm hook contract]); flush() does the same for callers that wait bucket by bucket.
//  * The second all-reduce's completion callback does rank-local work only: Q /= world, M <- P
//    Q^T into the bucket, the new error/P/Q memories, then completes the bucket's future. A
//    failure anywhere goes into that future, so the reducer raises instead of hanging.
//  * Nothing of the bucket's memories is modified before the callback: this step's Q is a copy.
//    A step that ends before its last bucket (an exception in backward) leaves held-back buckets
//    behind; the next runHook of a new step (bucket index not above the previous one, or any
//    call after a last bucket) fails their futures and drops them, their memories untouched, and
//    waits for the callbacks still running, so nothing leaks into the new step. Every rank that
//    raised at the same point drops the same buckets.
//  * The step counter advances with the last bucket; warm-up steps and buckets of other dtypes
//    are one plain all-reduce, issued in the same order.

struct PowerSGDHook::InFlight {
  int64_t index = 0;
  PowerSGDPlan plan;
  at::Tensor buffer;              // the bucket: M is read from it, the result written to it
  std::vector<at::Tensor> grads;  // views of `buffer`, one per gradient
  at::Tensor before;              // the error-corrected local gradient (error feedback)
  at::Tensor first;               // the uncompressed tensors, then P: the first all-reduce
  at::Tensor q;                   // this step's Q, flat; the Q memory is replaced at the end
  c10::intrusive_ptr<c10::ivalue::Future> first_done;
  c10::intrusive_ptr<c10::ivalue::Future> result;  // what runHook returned for the bucket

  at::Tensor p() const {
    return first.narrow(0, plan.uncompressed_numel, plan.p_numel);
  }
};

void check_options(const PowerSGDOptions& o) {
  TORCH_CHECK_VALUE(o.rank >= 1, "powersgd: rank must be >= 1, got ", o.rank);
  TORCH_CHECK_VALUE(o.start_iter >= 0, "powersgd: start_powerSGD_iter must be >= 0, got ",
                    o.start_iter);
  TORCH_CHECK_VALUE(
      !(o.use_error_feedback || o.warm_start) || o.start_iter > 1,
      "powersgd: start_powerSGD_iter must be > 1 when use_error_feedback or "
      "warm_start is enabled (DDP may rebuild its buckets after the first step), got ",
      o.start_iter);
  TORCH_CHECK_VALUE(std::isfinite(o.min_compression_rate) && o.min_compression_rate >= 0,
                    "powersgd: min_compression_rate must be a finite number >= 0, got ",
                    o.min_compression_rate);
  TORCH_CHECK_VALUE(std::isfinite(o.epsilon) && o.epsilon >= 0,
                    "powersgd: orthogonalization_epsilon must be a finite number >= 0, got ",
                    o.epsilon);
  TORCH_CHECK_VALUE(o.seed < (uint64_t(1) << 32), "powersgd: random_seed must be < 2**32, got ",
                    o.seed);
}

PowerSGDHook::PowerSGDHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                           PowerSGDOptions options)
    : CommHook(std::move(process_group)), options_(options), seeds_(options.seed) {
  TORCH_CHECK(process_group_, "PowerSGDHook: process_group must not be None");
  check_options(options);
  world_size_ = process_group_->getSize();
}

PowerSGDHook::~PowerSGDHook() {
  std::lock_guard<std::mutex> guard(mutex_);
  for (auto& b : pending_) {
    b->result->setErrorIfNeeded(std::make_exception_ptr(std::runtime_error(
        "torchlane powersgd hook: destroyed before the bucket's second all-reduce was launched")));
  }
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

void PowerSGDHook::reset_bucket_state() {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(pending_.empty() && !in_step_,
              "PowerSGD hook: the bucket layout changed while a step was in flight");
  for (auto& f : outstanding_) {
    f->wait();  // the last step's callbacks are done writing their memories
  }
  outstanding_.clear();
  std::lock_guard<std::mutex> guard(memory_->mutex);
  memory_->buckets.clear();  // P, Q and error feedback restart, as for a new model
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> PowerSGDHook::memory(int64_t bucket_index) const {
  std::lock_guard<std::mutex> guard(memory_->mutex);
  auto it = memory_->buckets.find(bucket_index);
  if (it == memory_->buckets.end()) {
    return {};
  }
  return {it->second.p, it->second.q, it->second.error};
}

std::vector<CommHook::CollectiveEvent> PowerSGDHook::step_collectives() const {
  std::lock_guard<std::mutex> guard(mutex_);
  return collectives_;
}

void PowerSGDHook::log_collective_locked(int64_t bucket, const char* op) {
  collectives_.push_back({bucket, op, now_ns()});
}

c10::intrusive_ptr<c10::ivalue::Future> PowerSGDHook::allreduce_mean(int64_t index,
                                                                     at::Tensor buffer) {
  log_collective_locked(index, "allreduce");
  return CommHook::allreduce_mean(std::move(buffer));
}

c10::intrusive_ptr<c10::ivalue::Future> PowerSGDHook::runHook(c10d::GradBucket& bucket) {
  std::lock_guard<std::mutex> guard(mutex_);
  const auto index = static_cast<int64_t>(bucket.getIndex());
  if (!in_step_ || index <= last_index_) {
    begin_step_locked();
  }
  in_step_ = true;
  last_index_ = index;
  at::Tensor buffer = bucket.getBufferRef();
  c10::intrusive_ptr<c10::ivalue::Future> result;
  size_t hold = 0;  // buckets left pending: this one, unless it is the last
  // A sparse bucket goes uncompressed: Note [Sparse buckets in the C++ hooks].
  if (iter_ < options_.start_iter || buffer.is_sparse()) {
    result = allreduce_mean(index, buffer);
  } else if (!is_float_or_double(buffer)) {
    TORCH_WARN_ONCE("torchlane powersgd hook: buckets of dtype ", buffer.scalar_type(),
                    " are all-reduced uncompressed; PowerSGD compresses float32/float64 buckets");
    result = allreduce_mean(index, buffer);
  } else {
    pending_.push_back(launch_first_locked(bucket));
    result = pending_.back()->result;
    hold = 1;
  }
  if (bucket.isLast()) {
    advance_pending_locked(0);
    TORCH_INTERNAL_ASSERT(pending_.empty(), "powersgd: a bucket is still held back after the last");
    ++iter_;  // the step counter advances with the last bucket, as in torch's hook
    in_step_ = false;
  } else {
    advance_pending_locked(hold);
  }
  return result;
}

void PowerSGDHook::flush() {
  std::lock_guard<std::mutex> guard(mutex_);
  advance_pending_locked(0);
}

void PowerSGDHook::begin_step_locked() {
  for (auto& b : pending_) {
    b->result->setErrorIfNeeded(std::make_exception_ptr(std::runtime_error(
        "torchlane powersgd hook: the backward pass that launched bucket " +
        std::to_string(b->index) + " ended before its last bucket; its reduction was dropped")));
  }
  pending_.clear();
  for (auto& f : outstanding_) {
    f->wait();  // the callbacks of the previous step are done with their memories
  }
  outstanding_.clear();
  collectives_.clear();
  last_index_ = -1;
  if (rollback_enabled_) {  // Note [Rolling back a non-finite step]
    snapshot_.taken = true;
    snapshot_.iter = iter_;
    snapshot_.numel_before = numel_before_;
    snapshot_.numel_after = numel_after_;
    snapshot_.seeds = seeds_;
    std::lock_guard<std::mutex> guard(memory_->mutex);
    snapshot_.buckets = memory_->buckets;
  }
}

void PowerSGDHook::end_step(bool grads_finite) {
  std::lock_guard<std::mutex> guard(mutex_);
  if (!snapshot_.taken) {
    return;
  }
  if (!grads_finite) {
    for (auto& f : outstanding_) {
      f->wait();  // done already (the reducer waited on every result); finish() has written
    }
    iter_ = snapshot_.iter;
    numel_before_ = snapshot_.numel_before;
    numel_after_ = snapshot_.numel_after;
    seeds_ = snapshot_.seeds;
    std::lock_guard<std::mutex> memory_guard(memory_->mutex);
    memory_->buckets = std::move(snapshot_.buckets);
  }
  snapshot_ = Snapshot();
}

void PowerSGDHook::advance_pending_locked(size_t keep) {
  while (pending_.size() > keep) {
    auto b = std::move(pending_.front());
    pending_.pop_front();
    try {
      launch_second_locked(b);
    } catch (...) {
      b->result->setErrorIfNeeded(std::current_exception());
    }
  }
}

std::shared_ptr<PowerSGDHook::InFlight> PowerSGDHook::launch_first_locked(
    c10d::GradBucket& bucket) {
  // Profiler ranges, one per compression step: P = M Q (+ launch), Q = M^T P (+ launch), and
  // M = P Q^T in finish(), which runs in the second all-reduce's callback (often Gloo's thread).
  RECORD_FUNCTION("torchlane::powersgd_compress_p",
                  std::vector<c10::IValue>({bucket.getBufferRef()}));
  auto b = std::make_shared<InFlight>();
  b->index = static_cast<int64_t>(bucket.getIndex());
  b->buffer = bucket.getBufferRef();
  b->grads = bucket.getGradients();
  const at::Tensor& buffer = b->buffer;
  BucketMemory mem;
  {
    std::lock_guard<std::mutex> guard(memory_->mutex);
    auto it = memory_->buckets.find(b->index);
    if (it != memory_->buckets.end()) {
      mem = it->second;
    }
  }

  if (options_.use_error_feedback) {
    if (mem.error.defined() && mem.error.numel() == buffer.numel()) {
      b->buffer.add_(mem.error);
    }
    b->before = buffer.clone();
  }

  std::vector<std::vector<int64_t>> shapes;
  shapes.reserve(b->grads.size());
  for (const auto& g : b->grads) {
    shapes.emplace_back(g.sizes().vec());
  }
  b->plan = powersgd_plan(shapes, options_.rank, options_.min_compression_rate);
  const PowerSGDPlan& plan = b->plan;
  numel_before_ += plan.numel_before;
  numel_after_ += plan.numel_after;

  const bool randomize = !options_.warm_start || !mem.p.defined() ||
                         mem.p.numel() != plan.p_numel || mem.q.numel() != plan.q_numel;
  b->q = randomize ? at::empty({plan.q_numel}, buffer.options()) : mem.q.clone();
  b->first = at::empty({plan.uncompressed_numel + plan.p_numel}, buffer.options());
  MatrixViews v = matrix_views(plan, b->grads, b->p(), b->q);
  if (randomize && !v.q.empty()) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seeds_.next());
    for (auto& q : v.q) {
      q.copy_(at::randn({1, q.size(0), q.size(1)}, gen, at::TensorOptions().dtype(q.dtype()))
                  .view_as(q));
    }
  }
  for (auto& q : v.q) {
    orthogonalize_(q, options_.epsilon);
  }
  for (size_t i = 0; i < v.m.size(); ++i) {
    at::mm_out(v.p[i], v.m[i], v.q[i]);
  }
  int64_t offset = 0;
  for (auto t : plan.uncompressed) {
    const at::Tensor& g = b->grads[t];
    b->first.narrow(0, offset, g.numel()).copy_(g.reshape({-1}));
    offset += g.numel();
  }

  std::vector<c10::Device> devices;
  if (!buffer.is_cpu()) {
    devices.push_back(buffer.device());
  }
  b->result = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get(), devices);
  // One all-reduce for the uncompressed tensors and P together.
  log_collective_locked(b->index, "P");
  b->first_done = launch_allreduce({b->first});
  return b;
}

void PowerSGDHook::launch_second_locked(const std::shared_ptr<InFlight>& b) {
  b->first_done->waitAndThrow();
  RECORD_FUNCTION("torchlane::powersgd_compress_q", std::vector<c10::IValue>({b->buffer}));
  int64_t offset = 0;
  for (auto t : b->plan.uncompressed) {
    at::Tensor g = b->grads[t];
    g.copy_(b->first.narrow(0, offset, g.numel()).view_as(g)).div_(world_size_);
    offset += g.numel();
  }
  MatrixViews v = matrix_views(b->plan, b->grads, b->p(), b->q);
  for (auto& p : v.p) {
    orthogonalize_(p, options_.epsilon);
  }
  for (size_t i = 0; i < v.m.size(); ++i) {
    at::mm_out(v.q[i], v.m[i].t(), v.p[i]);
  }
  if (b->plan.q_numel == 0) {  // nothing compressed: no second all-reduce (the same on all ranks)
    finish(b, *memory_, options_, world_size_, nullptr);
    return;
  }
  log_collective_locked(b->index, "Q");
  auto second_done = launch_allreduce({b->q});
  outstanding_.push_back(b->result);
  // Rank-local work only (Note [PowerSGD pipeline]); it may run after the hook is gone.
  second_done->addCallback(
      [b, memory = memory_, options = options_, world = world_size_](c10::ivalue::Future& done) {
        finish(b, *memory, options, world, &done);
      });
}

void PowerSGDHook::finish(const std::shared_ptr<InFlight>& b, Memories& memory,
                          const PowerSGDOptions& options, int64_t world_size,
                          const c10::ivalue::Future* second_done) {
  RECORD_FUNCTION("torchlane::powersgd_decompress", std::vector<c10::IValue>({b->buffer}));
  try {
    if (second_done && second_done->hasError()) {
      std::rethrow_exception(second_done->exception_ptr());
    }
    b->q.div_(world_size);
    MatrixViews v = matrix_views(b->plan, b->grads, b->p(), b->q);
    for (size_t i = 0; i < v.m.size(); ++i) {
      at::mm_out(v.m[i], v.p[i], v.q[i].t());
    }
    BucketMemory committed;
    if (options.use_error_feedback) {
      committed.error = b->before.sub_(b->buffer);
    }
    if (options.warm_start) {
      committed.p = b->p().clone();
      committed.q = b->q;
    }
    std::lock_guard<std::mutex> guard(memory.mutex);
    memory.buckets[b->index] = std::move(committed);
  } catch (...) {
    b->result->setErrorIfNeeded(std::current_exception());
    return;
  }
  b->result->markCompleted(c10::IValue(b->buffer));
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
