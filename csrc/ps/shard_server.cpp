#include "ps/shard_server.hpp"

#include <algorithm>
#include <limits>

namespace torchlane::ps {

ShardServer::ShardServer(at::Tensor shard, OuterOptions options,
                         std::optional<int64_t> max_staleness, std::vector<int64_t> workers)
    : shard_(std::move(shard)), options_(options), max_staleness_(max_staleness) {
  TORCH_CHECK_VALUE(shard_.dim() == 1 && shard_.is_contiguous() && shard_.is_floating_point(),
                    "ShardServer: shard must be a contiguous 1-D floating-point tensor, got shape ",
                    shard_.sizes(), " and dtype ", shard_.scalar_type());
  TORCH_CHECK_VALUE(options_.lr > 0, "ShardServer: outer_lr must be > 0, got ", options_.lr);
  TORCH_CHECK_VALUE(options_.momentum >= 0 && options_.momentum < 1,
                    "ShardServer: outer_momentum must be in [0, 1), got ", options_.momentum);
  TORCH_CHECK_VALUE(!options_.nesterov || options_.momentum > 0,
                    "ShardServer: nesterov needs outer_momentum > 0");
  TORCH_CHECK_VALUE(!max_staleness_ || *max_staleness_ >= 0,
                    "ShardServer: max_staleness must be >= 0 or None, got ", *max_staleness_);
  TORCH_CHECK_VALUE(!workers.empty(), "ShardServer: workers must not be empty");
  for (auto rank : workers) {
    workers_.push_back(Worker{rank});
  }
}

ShardServer::Worker& ShardServer::find(int64_t worker, const char* what) {
  for (auto& w : workers_) {
    if (w.rank == worker) {
      return w;
    }
  }
  TORCH_CHECK_VALUE(false, "ShardServer.", what, ": rank ", worker, " is not a worker");
}

const ShardServer::Worker& ShardServer::find(int64_t worker, const char* what) const {
  return const_cast<ShardServer*>(this)->find(worker, what);
}

int64_t ShardServer::min_live_clock() const {
  int64_t lowest = std::numeric_limits<int64_t>::max();
  for (const auto& w : workers_) {
    if (w.live) {
      lowest = std::min(lowest, w.clock);
    }
  }
  return lowest;
}

bool ShardServer::may_pull(int64_t worker) const {
  const auto& w = find(worker, "may_pull");
  if (!w.live) {
    return false;
  }
  return !max_staleness_ || w.clock - min_live_clock() <= *max_staleness_;
}

int64_t ShardServer::record_pull(int64_t worker) {
  auto& w = find(worker, "record_pull");
  TORCH_CHECK_VALUE(w.live, "ShardServer.record_pull: worker ", worker, " has left");
  TORCH_INTERNAL_ASSERT(may_pull(worker), "pull of worker ", worker, " breaks the staleness bound");
  w.pulled_round = w.clock;
  w.pulled_staleness = w.clock - min_live_clock();
  w.pulled_version = version_;
  return version_;
}

int64_t ShardServer::apply(int64_t worker, const at::Tensor& update) {
  auto& w = find(worker, "apply");
  TORCH_CHECK_VALUE(w.live, "ShardServer.apply: worker ", worker, " has left");
  TORCH_CHECK_VALUE(w.pulled_round == w.clock, "ShardServer.apply: worker ", worker,
                    " pushed without pulling the parameters of its round ", w.clock);
  TORCH_CHECK_VALUE(
      update.numel() == shard_.numel() && update.scalar_type() == shard_.scalar_type(),
      "ShardServer.apply: worker ", worker, " pushed ", update.numel(), " ", update.scalar_type(),
      " elements for a shard of ", shard_.numel(), " ", shard_.scalar_type());
  // torch.optim.SGD's single-tensor update, op for op (same kernels, so bitwise the same).
  at::Tensor step = update.view(shard_.sizes());
  if (options_.momentum != 0) {
    if (!momentum_buffer_.defined()) {
      momentum_buffer_ = step.clone();
    } else {
      momentum_buffer_.mul_(options_.momentum).add_(step, 1);
    }
    step = options_.nesterov ? step.add(momentum_buffer_, options_.momentum) : momentum_buffer_;
  }
  shard_.add_(step, -options_.lr);
  ++version_;
  log_.push_back(ApplyRecord{worker, w.clock, w.pulled_staleness, w.pulled_version, version_});
  ++w.clock;
  return version_;
}

void ShardServer::remove(int64_t worker, bool left) {
  auto& w = find(worker, "remove");
  w.live = false;
  w.dead = !left;
}

std::vector<int64_t> ShardServer::live_workers() const {
  std::vector<int64_t> out;
  for (const auto& w : workers_) {
    if (w.live) {
      out.push_back(w.rank);
    }
  }
  return out;
}

std::vector<int64_t> ShardServer::dead_workers() const {
  std::vector<int64_t> out;
  for (const auto& w : workers_) {
    if (w.dead) {
      out.push_back(w.rank);
    }
  }
  return out;
}

}  // namespace torchlane::ps
