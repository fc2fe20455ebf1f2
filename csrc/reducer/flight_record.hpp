#pragma once

#include <atomic>
#include <cstdint>

namespace torchlane {

// Note [Flight record]
// The reducer's last launched and last completed bucket collective, readable at any moment from
// another thread (the hang watchdog in torchlane/monitor.py) without taking the reducer's mutex,
// which the backward thread may hold while it is blocked. Every field is a relaxed atomic: a
// reader may see a launch a moment before its bucket index, which only matters for the instant
// of the launch and never for a collective that has been stuck for seconds. `seq` numbers every
// bucket collective this reducer launched, 1, 2, ... (the same sequence on every rank, since
// buckets launch in index order on every rank); `completed` is the highest finished one. The
// oldest unfinished collective is completed_seq + 1, and, since an iteration launches its buckets
// in index order starting at iteration_first_seq, its bucket is the difference of the two.
struct FlightRecord {
  std::atomic<int64_t> iteration{0};            // synchronised backward passes started
  std::atomic<int64_t> iteration_first_seq{1};  // seq of this iteration's bucket 0
  std::atomic<int64_t> launched_seq{0};
  std::atomic<int64_t> launched_bucket{-1};
  std::atomic<int64_t> launched_bytes{0};
  std::atomic<int64_t> launched_ns{0};  // steady clock, as now_ns()
  std::atomic<int64_t> completed_seq{0};
  std::atomic<int64_t> completed_bucket{-1};
  std::atomic<int64_t> completed_ns{0};

  void on_launch(int64_t seq, int64_t bucket, int64_t bytes, int64_t t_ns) {
    launched_bucket.store(bucket, std::memory_order_relaxed);
    launched_bytes.store(bytes, std::memory_order_relaxed);
    launched_ns.store(t_ns, std::memory_order_relaxed);
    launched_seq.store(seq, std::memory_order_relaxed);
  }

  // Completions may arrive out of order on some backends: keep the highest sequence number.
  void on_complete(int64_t seq, int64_t bucket, int64_t t_ns) {
    int64_t prev = completed_seq.load(std::memory_order_relaxed);
    while (prev < seq && !completed_seq.compare_exchange_weak(prev, seq)) {
    }
    if (prev < seq) {
      completed_bucket.store(bucket, std::memory_order_relaxed);
      completed_ns.store(t_ns, std::memory_order_relaxed);
    }
  }
};

}  // namespace torchlane
