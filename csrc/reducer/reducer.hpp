#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include "comm/comm_hook.hpp"
#include "reducer/bucket_plan.hpp"
#include "reducer/flight_record.hpp"
#include "reducer/grad_ready_hooks.hpp"
#include "reducer/step_timer.hpp"

namespace torchlane {

struct ReducerOptions {
  int64_t bucket_cap_bytes = 25 * 1024 * 1024;
  int64_t first_bucket_cap_bytes = 1024 * 1024;
  bool find_unused_parameters = false;
  bool gradient_as_bucket_view = false;
  bool static_graph = false;
  bool check_finite = false;
  bool verify_layout = false;  // Note [Layout verification]
  // Parameter indices whose gradient is sparse (nn.Embedding(sparse=True)), and dense-gradient
  // parameters reduced row-sparse on request. See Note [Sparse gradients].
  std::vector<int64_t> sparse_params;
  std::vector<int64_t> row_sparse_params;
};

// One flat buffer holding the gradients of several parameters of one dtype and device.
struct Bucket {
  std::vector<int64_t> params;    // parameter indices, in layout order
  std::vector<size_t> offsets;    // element offset of each parameter in `buffer`
  std::vector<size_t> lengths;    // numel of each parameter
  at::Tensor buffer;              // flat, contiguous
  std::vector<at::Tensor> views;  // views of `buffer` shaped like each parameter
  size_t pending = 0;             // parameters not yet ready in this iteration
  c10::intrusive_ptr<c10::ivalue::Future> future;
  BucketTimer timer;  // Note [Step timer]
  // Note [Sparse gradients]: a bucket of one parameter whose gradient travels as a sparse COO
  // tensor (`buffer` is then empty and `views` unused). row_sparse: the parameter's `.grad` is
  // dense and is converted to (row index, row) pairs for the reduction.
  bool sparse = false;
  bool row_sparse = false;
  at::Tensor sparse_grad;  // this iteration's sparse gradient, reduced in place
  int64_t wire_bytes = 0;  // bytes this rank handed to the process group for the bucket
};

// Timing and volume of the last synchronised backward pass (see Reducer::stats()).
struct StepStats {
  StepTimes times;  // comm_end_ns: the latest bucket_times[b].done_ns()
  std::vector<BucketTimer> bucket_times;
  int64_t bytes_reduced = 0;  // uncompressed bytes of all buckets
  int64_t bytes_sent = 0;     // bytes this rank handed to the process group (after compression)
  int64_t row_sparse_bytes_saved = 0;  // dense bytes of row-sparse parameters minus what they sent
  std::vector<CommHook::CollectiveEvent> collectives;  // from a hook that records them
  std::vector<int64_t> ready_order;  // parameter indices in the order they became ready
};

// Note [Reducer life cycle]
// Per synchronised iteration: the Python wrapper calls prepare_for_forward() before the forward
// (which raises if the previous reduction never finished, e.g. a parameter got no gradient),
// rebuild_buckets() (once, see Note [Bucket rebuild]) and prepare_for_backward(outputs) after it.
// During backward, a C++ post-hook on each parameter's AccumulateGrad node calls
// autograd_hook(i): the gradient is copied (pre-divided by world size when no comm hook is set)
// into its bucket slot, and a bucket whose last gradient arrived is launched at once, buckets in
// index order on every rank. The first hook queues finalize_backward() on the autograd engine; it
// runs once backward is done, waits for every bucket's future and writes the averaged gradients to
// `.grad`. When require_backward_grad_sync is off (no_sync), prepare_for_backward is not called
// and the hooks return immediately, so gradients accumulate locally in `.grad`.
//
// Note [Reducer states]
// Four flags of the per-iteration state form the reducer's state machine (the others:
// layout_verified_ is "Note [Layout verification] ran in this backward", rebuilt_ is set once):
//
//   state       expect_hooks_ backward_started_ require_finalize_   entered by
//   Idle        0             any               0                   construction, a finished
//                                                                   reduction, abandon_iteration
//   Armed       1             0                 0                   prepare_for_backward
//   Reducing    1             1                 1                   the first hook (from Armed)
//
// finalize_backward moves Reducing -> Idle when every bucket was launched, else stays (a nested
// backward ended, or parameters are unused). prepare_for_forward in Reducing means a reduction
// never finished: it raises naming the parameters without a gradient and abandons to Idle.
// Hooks in Idle return at once (no_sync: gradients accumulate in .grad). finalize_queued_ (a
// callback is queued on the running graph task) is only ever set in Reducing.
// check_states_locked() asserts the table in debug builds (TORCHLANE_DEBUG=1).
class Reducer {
 public:
  Reducer(std::vector<at::Tensor> params, std::vector<std::string> param_names,
          c10::intrusive_ptr<c10d::ProcessGroup> process_group, ReducerOptions options);
  ~Reducer();

  Reducer(const Reducer&) = delete;
  Reducer& operator=(const Reducer&) = delete;

  void prepare_for_forward();
  void prepare_for_backward(const std::vector<at::Tensor>& outputs);
  // Rebuilds buckets from the first iteration's gradient-ready order; returns true if it did.
  bool rebuild_buckets();
  void register_comm_hook(std::shared_ptr<c10d::CommHookInterface> hook);
  // Re-plans the buckets with new caps between iterations (Note [Bucket cap autotuning]).
  void set_bucket_caps(int64_t cap_bytes, int64_t first_cap_bytes);
  // Shadows one synchronised backward of the other ranks after this one joined (Note [Join]).
  void run_zero_allreduces();
  // Queues finalize_backward on the running graph task, once per backward.
  void queue_finalize();
  // The end-of-backward work: waits for every bucket and writes `.grad`.
  void finalize_backward();
  // Asserts Note [Reducer states] in debug builds; a no-op otherwise.
  void check_states_locked() const;
  bool static_graph_first_iteration() const;
  // Note [No silent gradient loss]: whether a backward that finds no prepared reduction may
  // accumulate locally (no_sync() was entered or a forward ran with gradient sync off since the
  // last prepare_for_backward). Otherwise such a backward raises.
  void allow_local_backward() {
    std::lock_guard<std::mutex> lock(mutex_);
    local_backward_allowed_ = true;
  }

  const std::vector<Bucket>& buckets() const {
    return buckets_;
  }
  StepStats stats() const;
  // Live progress for the hang watchdog; see Note [Flight record].
  const std::shared_ptr<FlightRecord>& flight_record() const {
    return flight_;
  }
  // check_finite: whether the last reduced gradients were all finite (the same on every rank).
  bool grads_finite() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return grads_finite_;
  }

 private:
  void autograd_hook(int64_t index);
  void on_gradient_ready(int64_t index);
  void queue_finalize_locked();
  void finalize_locked();
  void abandon_iteration();
  c10d::GradBucket make_grad_bucket(size_t b, const at::Tensor& buffer) const;
  void mark_ready(int64_t index);
  void copy_grad_to_bucket(int64_t index);
  void copy_sparse_grad_to_bucket(int64_t index);
  at::Tensor empty_sparse_grad(int64_t index) const;
  void write_back_sparse(size_t b);
  int64_t bucket_bytes(const Bucket& bucket) const;
  void launch_ready_buckets();
  void launch_bucket(size_t b);
  void write_back_gradients();
  void publish_stats();
  void find_unused_parameters(const std::vector<at::Tensor>& outputs);
  bool tracks_usage() const;
  bool sends_usage_flags() const;
  void verify_layout_across_ranks();
  std::vector<std::string> unready_parameter_names_locked() const;
  void initialize_buckets(const std::vector<std::vector<int64_t>>& assignment);
  void reset_iteration_state();
  std::string describe_bucket(size_t b) const;
  void wait_or_throw(c10::ivalue::Future& future, const std::string& what);

  std::vector<at::Tensor> params_;
  std::vector<std::string> param_names_;
  std::vector<TensorMeta> param_meta_;
  std::vector<char> sparse_kind_;  // per parameter: 0 dense, 1 sparse, 2 row-sparse
  c10::intrusive_ptr<c10d::ProcessGroup> process_group_;
  ReducerOptions options_;
  int64_t world_size_;

  GradReadyHooks grad_hooks_;  // Note [Gradient-ready hooks]

  std::vector<Bucket> buckets_;
  std::vector<std::pair<size_t, size_t>> param_location_;  // (bucket, slot)

  std::shared_ptr<std::atomic<bool>> alive_ = std::make_shared<std::atomic<bool>>(true);
  std::shared_ptr<c10d::CommHookInterface> comm_hook_;
  bool comm_hook_counts_bytes_ = false;

  // Per-iteration state, guarded by mutex_. See Note [Reducer states].
  mutable std::mutex mutex_;
  bool expect_hooks_ = false;            // a synchronised backward is expected
  bool backward_started_ = false;        // the first hook of this backward has run
  bool finalize_queued_ = false;         // finalize_backward is queued on a graph task
  bool layout_verified_ = false;         // Note [Layout verification] done for this iteration
  bool require_finalize_ = false;        // reduction started but not finished
  bool local_backward_allowed_ = false;  // See Note [No silent gradient loss]
  size_t next_bucket_ = 0;
  std::vector<char> ready_;
  std::vector<int64_t> unused_;           // locally unused (find_unused / static graph)
  std::vector<int32_t> local_used_host_;  // 1 = got a gradient on this rank this iteration
  std::vector<char> globally_unused_;     // no rank produced a gradient (last known)
  at::Tensor local_used_result_;          // all-reduced usage flags
  c10::intrusive_ptr<c10::ivalue::Future> local_used_future_;
  int64_t iterations_ = 0;  // finished synchronised backward passes
  bool grads_finite_ = true;
  StepTimes step_times_;                   // Note [Step timer]
  std::vector<int64_t> step_ready_order_;  // this iteration's, for the logging data

  // Note [Bucket rebuild]: the order in which gradients became ready in the first synchronised
  // iteration; rank 0's order is broadcast and buckets are rebuilt from it once.
  std::vector<int64_t> ready_order_;
  bool rebuilt_ = false;
  // The parameter order the current buckets were cut from (Note [Bucket cap autotuning]).
  std::vector<int64_t> bucket_order_;

  // static_graph: hook firings per parameter observed in the first iteration, and this one's.
  std::vector<int64_t> expected_hook_count_;
  std::vector<int64_t> hook_count_;

  mutable std::mutex stats_mutex_;
  StepStats last_stats_;
  int64_t step_bytes_sent_ = 0;
  int64_t step_bytes_saved_ = 0;  // row-sparse savings of this step
  // Shared with bucket completion callbacks, which may outlive the reducer.
  std::shared_ptr<FlightRecord> flight_ = std::make_shared<FlightRecord>();
  int64_t collective_seq_ = 0;
};

}  // namespace torchlane
