#pragma once

#include <chrono>
#include <cstdint>

namespace torchlane::comm {

// The one clock of comm_stats() and every hook's event log: steady-clock nanoseconds, so that the
// reducer's bucket events and a hook's collective launches are on the same time line.
inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace torchlane::comm
