#include "comm/kept_works.hpp"

#include <algorithm>
#include <chrono>
#include <iterator>
#include <mutex>
#include <thread>

namespace torchlane::comm {
namespace {

// Beyond this many kept works the oldest are dropped anyway (long finished, in practice).
constexpr size_t kMaxKept = 4096;

using WorkPtr = c10::intrusive_ptr<c10d::Work>;

struct Kept {
  std::mutex mu;
  std::vector<WorkPtr> works;
  KeptWorkStats stats;
};

// Never destroyed: static destructors run after the interpreter is gone.
Kept& kept() {
  static Kept* k = new Kept();
  return *k;
}

// Moves the works only `v` references (their collective is done and the process group let go of
// them) into `drop`; returns how many.
size_t take_finished(std::vector<WorkPtr>& v, std::vector<WorkPtr>& drop) {
  const auto finished =
      std::stable_partition(v.begin(), v.end(), [](const WorkPtr& w) { return w.use_count() > 1; });
  const auto n = static_cast<size_t>(v.end() - finished);
  drop.insert(drop.end(), std::make_move_iterator(finished), std::make_move_iterator(v.end()));
  v.erase(finished, v.end());
  return n;
}

size_t sole_owned(const std::vector<WorkPtr>& v) {
  return static_cast<size_t>(
      std::count_if(v.begin(), v.end(), [](const WorkPtr& w) { return w.use_count() == 1; }));
}

}  // namespace

c10::intrusive_ptr<c10::ivalue::Future> launched(WorkPtr work) {
  auto future = work->getFuture();
  keep(std::move(work));
  return future;
}

void keep(WorkPtr work) {
  std::vector<WorkPtr> drop;  // destroyed after the lock is released
  {
    Kept& k = kept();
    std::lock_guard<std::mutex> guard(k.mu);
    auto& v = k.works;
    k.stats.destroyed_here += take_finished(v, drop);
    if (v.size() >= kMaxKept) {
      const auto n = static_cast<std::ptrdiff_t>(v.size() - kMaxKept + 1);
      std::vector<WorkPtr> oldest(std::make_move_iterator(v.begin()),
                                  std::make_move_iterator(v.begin() + n));
      v.erase(v.begin(), v.begin() + n);
      k.stats.destroyed_here += sole_owned(oldest);
      drop.insert(drop.end(), std::make_move_iterator(oldest.begin()),
                  std::make_move_iterator(oldest.end()));
    }
    v.push_back(std::move(work));
    ++k.stats.launched;
  }
}

void drop_finished() {
  std::vector<WorkPtr> drop;  // destroyed after the lock is released
  Kept& k = kept();
  std::lock_guard<std::mutex> guard(k.mu);
  k.stats.destroyed_here += take_finished(k.works, drop);
}

std::vector<WorkPtr> take_kept_works() {
  Kept& k = kept();
  std::lock_guard<std::mutex> guard(k.mu);
  std::vector<WorkPtr> out;
  out.swap(k.works);
  return out;
}

size_t wait_sole_owner(const std::vector<WorkPtr>& works, double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(std::max(timeout_s, 0.0)));
  for (const auto& w : works) {
    while (w.use_count() > 1 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const size_t sole = sole_owned(works);
  Kept& k = kept();
  std::lock_guard<std::mutex> guard(k.mu);
  k.stats.destroyed_here += sole;
  return works.size() - sole;
}

KeptWorkStats kept_work_stats() {
  Kept& k = kept();
  std::lock_guard<std::mutex> guard(k.mu);
  KeptWorkStats s = k.stats;
  s.kept = k.works.size();
  return s;
}

}  // namespace torchlane::comm
