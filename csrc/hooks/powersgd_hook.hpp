#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "comm/comm_hook.hpp"

namespace torchlane::hooks {

struct PowerSGDOptions {
  int64_t rank = 1;  // matrix approximation rank r
  int64_t start_iter = 1000;
  double min_compression_rate = 2.0;
  bool use_error_feedback = true;
  bool warm_start = true;
  double epsilon = 0.0;  // orthogonalization epsilon
  uint64_t seed = 0;
};

// The one copy of the option rules (ValueError naming the argument, with torch's names); the hook
// and torchlane.hooks.PowerSGDState both call it.
void check_options(const PowerSGDOptions& options);

// ---- pure math, testable alone (see Note [PowerSGD]) ----

// One gradient tensor compressed as a rows x cols matrix M ~ P Q^T with P: rows x rank and
// Q: cols x rank, stored at the given offsets of the bucket's flat P and Q memories.
struct PowerSGDMatrix {
  int64_t tensor;  // index into the bucket's gradients
  int64_t rows, cols, rank;
  int64_t p_offset, q_offset;
};

struct PowerSGDPlan {
  std::vector<PowerSGDMatrix> compressed;  // grouped by (rows, cols), first appearance first
  std::vector<int64_t> uncompressed;       // gradient indices all-reduced as they are
  int64_t p_numel = 0, q_numel = 0, uncompressed_numel = 0;
  int64_t numel_before = 0, numel_after = 0;  // compression statistics, in elements
};

// Worth compressing when (rows + cols) * rank * min_compression_rate < rows * cols.
bool powersgd_should_compress(int64_t rows, int64_t cols, int64_t rank,
                              double min_compression_rate);
PowerSGDPlan powersgd_plan(const std::vector<std::vector<int64_t>>& shapes, int64_t rank,
                           double min_compression_rate);
// Orthonormalises the columns of a 2-D (rows x cols) tensor in place by modified Gram-Schmidt:
// column i is divided by (its norm + epsilon), then projected out of columns i+1... A zero column
// with epsilon == 0 becomes zero instead of NaN.
void orthogonalize_(at::Tensor& matrix, double epsilon);

// The sequence of seeds drawn for re-randomising Q, identical to
// numpy.random.RandomState(seed).randint(1_000_000_000) called repeatedly (as torch's hook does).
class PowerSGDSeeds {
 public:
  explicit PowerSGDSeeds(uint64_t seed) : engine_(static_cast<uint32_t>(seed)) {}
  uint32_t next();

 private:
  std::mt19937 engine_;
};

// PowerSGD (Vogels et al. 2019) with torch's powerSGD_hook semantics. See Note [PowerSGD] and
// Note [PowerSGD pipeline].
class PowerSGDHook : public CommHook {
 public:
  PowerSGDHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group, PowerSGDOptions options);
  ~PowerSGDHook() override;

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override;
  void flush() override;
  std::vector<CollectiveEvent> step_collectives() const override;
  void end_step(bool grads_finite) override;
  void reset_bucket_state() override;
  std::string name() const override {
    return "powersgd";
  }

  const PowerSGDOptions& options() const {
    return options_;
  }
  int64_t iter() const;
  // (compression rate, elements before, elements after) over all compressed steps so far.
  std::tuple<double, int64_t, int64_t> compression_stats() const;
  // (P memory, Q memory, error-feedback memory) of a bucket; undefined tensors where absent.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> memory(int64_t bucket_index) const;

 private:
  struct BucketMemory {
    at::Tensor p, q, error;
  };
  // Written by completion callbacks, which may outlive the hook: shared, with a leaf lock that is
  // never held while waiting or communicating.
  struct Memories {
    std::mutex mutex;
    std::unordered_map<int64_t, BucketMemory> buckets;
  };
  struct InFlight;  // a compressed bucket between its two all-reduces (Note [PowerSGD pipeline])

  c10::intrusive_ptr<c10::ivalue::Future> allreduce_mean(int64_t index, at::Tensor buffer);
  void begin_step_locked();
  std::shared_ptr<InFlight> launch_first_locked(c10d::GradBucket& bucket);
  void launch_second_locked(const std::shared_ptr<InFlight>& bucket);
  void advance_pending_locked(size_t keep);
  static void finish(const std::shared_ptr<InFlight>& bucket, Memories& memory,
                     const PowerSGDOptions& options, int64_t world_size,
                     const c10::ivalue::Future* second_done);
  void log_collective_locked(int64_t bucket, const char* op);

  PowerSGDOptions options_;
  int64_t world_size_;
  // Guards everything below but memory_. runHook holds it while it waits for a P all-reduce; no
  // completion callback ever takes it (Gloo runs callbacks on its worker threads).
  mutable std::mutex mutex_;
  PowerSGDSeeds seeds_;
  int64_t iter_ = 0;
  int64_t numel_before_ = 0, numel_after_ = 0;
  bool in_step_ = false;     // a runHook call of this step ran; cleared by the last bucket
  int64_t last_index_ = -1;  // the bucket of the latest runHook call in this step
  std::deque<std::shared_ptr<InFlight>> pending_;  // first all-reduce launched, second not yet
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> outstanding_;  // second one launched
  std::vector<CollectiveEvent> collectives_;  // issued in this (or the last finished) step
  std::shared_ptr<Memories> memory_ = std::make_shared<Memories>();
  // The state before the current step, kept while step rollback is enabled. Memories are replaced
  // (never written in place) by finish(), so copying the map copies references only.
  struct Snapshot {
    bool taken = false;
    int64_t iter = 0, numel_before = 0, numel_after = 0;
    PowerSGDSeeds seeds{0};
    std::unordered_map<int64_t, BucketMemory> buckets;
  };
  Snapshot snapshot_;
};

}  // namespace torchlane::hooks
