#pragma once

#include <atomic>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include "comm/kept_works.hpp"

namespace torchlane {

// Note [Comm hook contract]
// A communication hook gets one bucket at a time, as torch DDP's hooks do: a c10d::GradBucket
// whose buffer is the flat, *unscaled* local gradient of the bucket's parameters (the reducer
// does not pre-divide by world size when a hook is registered). runHook launches the bucket's
// communication and returns a future whose value is a tensor with the buffer's numel and dtype
// holding the *averaged* gradient. The reducer waits on that future at the end of backward (or
// chains on it) and copies the result into the parameters' .grad.
//
// Every collective is issued from runHook (or flush) on the calling thread, never from a
// completion callback: the reducer calls runHook for buckets 0, 1, ..., last in the same order on
// every rank, so every rank issues the same collectives in the same order (ProcessGroupGloo
// matches them by issue order). A hook may hold part of a bucket's communication back until a
// later runHook call of the same step (PowerSGD's second all-reduce, Note [PowerSGD pipeline]),
// but once the call for the last bucket (GradBucket::isLast) returns, or flush() returns, every
// future it returned must complete without further calls. Errors go into the returned future.
//
// torchlane's built-in hooks derive from CommHook so that the reducer can report the bytes each
// rank actually put on the wire (after compression) in comm_stats(). Python hooks written for
// torch DDP are wrapped in torch's own c10d::PythonCommHook and report the uncompressed size.
class CommHook : public c10d::CommHookInterface {
 public:
  explicit CommHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group)
      : process_group_(std::move(process_group)) {}

  at::Tensor parseHookResult(const c10::IValue& result) override {
    TORCH_CHECK(result.isTensor() || result.isTensorList(),
                "torchlane comm hook: expected the future to hold a Tensor, got ",
                result.tagKind());
    return result.isTensor() ? result.toTensor() : result.toTensorVector().at(0);
  }

  virtual std::string name() const = 0;

  // Launches whatever communication the hook still holds back for the buckets it was given (see
  // above); for callers that wait on each bucket's future before passing the next one.
  virtual void flush() {}

  // The collectives issued in the current (or last finished) step, in issue order, for hooks that
  // record them (comm_stats()); launch_ns is steady-clock time.
  struct CollectiveEvent {
    int64_t bucket;
    std::string op;
    int64_t launch_ns;
  };
  virtual std::vector<CollectiveEvent> step_collectives() const {
    return {};
  }

  // Note [Rolling back a non-finite step]
  // With check_finite, a step whose reduced gradients hold a NaN/Inf is skipped by the caller
  // (`if model.grads_finite: opt.step()`). A stateful hook must then forget that step too, or one
  // NaN on one rank lives on in its error-feedback memory and poisons every later step. So the
  // reducer calls enable_step_rollback() once when it registers the hook with check_finite on,
  // and end_step(grads_finite) once per synchronised step, after the write-back (on every rank
  // alike: grads_finite is computed from the reduced values). A hook with state keeps what it
  // needs to undo the step while rollback is enabled (PowerSGD: its memories and counters,
  // which it replaces rather than mutates, so a copy of the references; top-k: a copy of each
  // residual it is about to change) and restores it on end_step(false): the following steps
  // then equal those of a run in which the skipped step never happened. Stateless hooks
  // (bf16/fp16 casts) keep the defaults.
  void enable_step_rollback() {
    rollback_enabled_ = true;
  }
  virtual void end_step(bool grads_finite) {}

  // The reducer changed its bucket layout between steps (Note [Bucket cap autotuning]): per-bucket
  // state keyed by bucket index no longer describes the same gradients and must be dropped. Called
  // on every rank alike, with no step in flight. Top-k keys its residuals by layout already.
  virtual void reset_bucket_state() {}

  // Bytes sent by this rank since the last call (the reducer calls it once per step).
  int64_t take_bytes_sent() {
    return bytes_sent_.exchange(0);
  }

 protected:
  void count_bytes_sent(int64_t bytes) {
    bytes_sent_ += bytes;
  }
  // Bytes a tensor puts on the wire: a sparse COO tensor sends its indices and values (Gloo's
  // sparse all-reduce all-gathers both), a dense one its elements.
  static int64_t wire_bytes(const at::Tensor& t) {
    if (t.is_sparse()) {
      return static_cast<int64_t>(t._indices().nbytes() + t._values().nbytes());
    }
    return t.numel() * static_cast<int64_t>(t.element_size());
  }

  // The launch sequence of every built-in hook's collective, in one place: count the bytes this
  // rank hands to the process group (comm_stats()' bytes_sent), launch, and keep the Work until
  // it is finished (Note [Kept works]). Returns the Work's future.
  c10::intrusive_ptr<c10::ivalue::Future> launch_allreduce(std::vector<at::Tensor> tensors) {
    for (const auto& t : tensors) {
      count_bytes_sent(wire_bytes(t));
    }
    return comm::launched(process_group_->allreduce(tensors));
  }
  c10::intrusive_ptr<c10::ivalue::Future> launch_allgather(
      std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor> inputs) {
    for (const auto& t : inputs) {
      count_bytes_sent(wire_bytes(t));
    }
    return comm::launched(process_group_->allgather(outputs, inputs));
  }
  // The uncompressed path (warm-up steps, buckets of a dtype a hook does not compress, sparse
  // buckets): divide by the world size first, as torch's allreduce_hook does, then sum. The future
  // holds `buffer`.
  //
  // Note [Sparse buckets in the C++ hooks]
  // A sparse-gradient bucket (Note [Sparse gradients], reducer.cpp) reaches a hook as a sparse COO
  // buffer. All of torchlane's C++ hooks pass it through uncompressed, here, reduced by the process
  // group's sparse all-reduce (the path torch's allreduce_hook takes). Compressing it would not be
  // sound or not pay: top-k and PowerSGD keep error-feedback state shaped like a dense bucket and a
  // sparse gradient already sends only the rows it touches; a bf16/fp16 cast of the values would
  // halve them, but Gloo's sparse reduction then sums in the narrow dtype and torch DDP has no such
  // path for sparse buckets to compare with, so it is left out rather than shipped untested.
  c10::intrusive_ptr<c10::ivalue::Future> allreduce_mean(at::Tensor buffer) {
    buffer.div_(process_group_->getSize());
    return launch_allreduce({buffer})->then(
        [buffer](c10::ivalue::Future& done) {
          done.value();  // rethrows a communication error
          return c10::IValue(buffer);
        },
        c10::TensorType::get());
  }

  c10::intrusive_ptr<c10d::ProcessGroup> process_group_;
  bool rollback_enabled_ = false;  // See Note [Rolling back a non-finite step]

 private:
  std::atomic<int64_t> bytes_sent_{0};
};

}  // namespace torchlane
