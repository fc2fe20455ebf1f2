#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "comm/clock.hpp"

namespace torchlane {

// Note [Step timer]
// comm_stats()' timeline of one synchronised backward pass, on comm/clock.hpp's clock. The
// reducer writes a bucket's times under its mutex, except the completion time: the collective's
// completion callback writes that, and it may run after the iteration ended (futures wake their
// waiters before running callbacks), so it writes to a slot it co-owns and every iteration gets a
// fresh slot (a new BucketTimer). A bucket's communication finished at the earlier of its
// callback and the return of finalize_backward's wait on it.
struct BucketTimer {
  int64_t ready_ns = 0;   // its last gradient arrived
  int64_t launch_ns = 0;  // the comm hook (or the all-reduce) was called
  int64_t return_ns = 0;  // the launch returned
  int64_t wait_ns = 0;    // finalize_backward's wait on its future returned
  std::shared_ptr<std::atomic<int64_t>> callback_ns = std::make_shared<std::atomic<int64_t>>(0);

  int64_t done_ns() const {
    const int64_t callback = callback_ns->load();
    return callback ? std::min(callback, wait_ns) : wait_ns;
  }
};

struct StepTimes {
  int64_t first_hook_ns = 0;    // the first gradient of the backward pass arrived
  int64_t backward_end_ns = 0;  // finalize_backward started: the autograd pass is over
  int64_t comm_end_ns = 0;      // the last bucket's communication finished
};

}  // namespace torchlane
