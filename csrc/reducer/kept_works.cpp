#include "reducer/kept_works.hpp"

#include <algorithm>
#include <chrono>
#include <iterator>
#include <mutex>
#include <thread>

namespace torchlane::comm {
namespace {

// Beyond this many kept works the oldest are dropped anyway (long finished, in practice).
constexpr size_t kMaxKept = 4096;

struct Kept {
  std::mutex mu;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
};

// Never destroyed: static destructors run after the interpreter is gone.
Kept& kept() {
  static Kept* k = new Kept();
  return *k;
}

}  // namespace

c10::intrusive_ptr<c10::ivalue::Future> launched(c10::intrusive_ptr<c10d::Work> work) {
  auto future = work->getFuture();
  std::vector<c10::intrusive_ptr<c10d::Work>> drop;  // destroyed after the lock is released
  {
    Kept& k = kept();
    std::lock_guard<std::mutex> guard(k.mu);
    auto& v = k.works;
    const auto solely_kept = std::stable_partition(
        v.begin(), v.end(), [](const c10::intrusive_ptr<c10d::Work>& w) {
          return w.use_count() > 1;
        });
    drop.assign(std::make_move_iterator(solely_kept), std::make_move_iterator(v.end()));
    v.erase(solely_kept, v.end());
    if (v.size() >= kMaxKept) {
      const auto n = static_cast<std::ptrdiff_t>(v.size() - kMaxKept + 1);
      drop.insert(drop.end(), std::make_move_iterator(v.begin()),
                  std::make_move_iterator(v.begin() + n));
      v.erase(v.begin(), v.begin() + n);
    }
    v.push_back(std::move(work));
  }
  return future;
}

std::vector<c10::intrusive_ptr<c10d::Work>> take_kept_works() {
  Kept& k = kept();
  std::lock_guard<std::mutex> guard(k.mu);
  std::vector<c10::intrusive_ptr<c10d::Work>> out;
  out.swap(k.works);
  return out;
}

size_t wait_sole_owner(const std::vector<c10::intrusive_ptr<c10d::Work>>& works,
                       double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(std::max(timeout_s, 0.0)));
  size_t shared = 0;
  for (const auto& w : works) {
    while (w.use_count() > 1 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    shared += w.use_count() > 1 ? 1 : 0;
  }
  return shared;
}

size_t kept_work_count() {
  Kept& k = kept();
  std::lock_guard<std::mutex> guard(k.mu);
  return k.works.size();
}

}  // namespace torchlane::comm
