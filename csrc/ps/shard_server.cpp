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

void ShardServer::rejoin(int64_t worker) {
  auto& w = find(worker, "rejoin");
  int64_t slowest = std::numeric_limits<int64_t>::max();
  for (const auto& other : workers_) {
    if (other.live && other.rank != worker) {
      slowest = std::min(slowest, other.clock);
    }
  }
  if (slowest != std::numeric_limits<int64_t>::max()) {
    w.clock = std::max(w.clock, slowest);
  }
  w.live = true;
  w.dead = false;
  w.pulled_round = -1;
}

ShardServer::State ShardServer::state() const {
  auto opts = at::TensorOptions().dtype(at::kLong);
  auto workers = at::empty({static_cast<int64_t>(workers_.size()), 4}, opts);
  auto wa = workers.accessor<int64_t, 2>();
  for (size_t i = 0; i < workers_.size(); ++i) {
    const auto& w = workers_[i];
    wa[i][0] = w.rank;
    wa[i][1] = w.clock;
    wa[i][2] = w.live;
    wa[i][3] = w.dead;
  }
  auto log = at::empty({static_cast<int64_t>(log_.size()), 5}, opts);
  auto la = log.accessor<int64_t, 2>();
  for (size_t i = 0; i < log_.size(); ++i) {
    const auto& r = log_[i];
    la[i][0] = r.worker;
    la[i][1] = r.round;
    la[i][2] = r.staleness;
    la[i][3] = r.base_version;
    la[i][4] = r.version;
  }
  return State{shard_.clone(), momentum_buffer_.defined() ? momentum_buffer_.clone() : at::Tensor(),
               version_, workers, log};
}

void ShardServer::restore(const State& state) {
  TORCH_CHECK_VALUE(
      state.shard.sizes() == shard_.sizes() && state.shard.scalar_type() == shard_.scalar_type(),
      "ShardServer.restore: the checkpoint's shard has shape ", state.shard.sizes(), " and dtype ",
      state.shard.scalar_type(), ", this server's ", shard_.sizes(), " and ", shard_.scalar_type());
  TORCH_CHECK_VALUE(
      !state.momentum_buffer.defined() || state.momentum_buffer.sizes() == shard_.sizes(),
      "ShardServer.restore: the momentum buffer does not match the shard");
  TORCH_CHECK_VALUE(state.workers.dim() == 2 && state.workers.size(0) == int64_t(workers_.size()) &&
                        state.workers.size(1) == 4 && state.workers.scalar_type() == at::kLong,
                    "ShardServer.restore: the checkpoint has ", state.workers.sizes(),
                    " worker rows, this server ", workers_.size(), " workers");
  TORCH_CHECK_VALUE(
      state.log.dim() == 2 && state.log.size(1) == 5 && state.log.scalar_type() == at::kLong,
      "ShardServer.restore: malformed log of shape ", state.log.sizes());
  auto wa = state.workers.accessor<int64_t, 2>();
  for (size_t i = 0; i < workers_.size(); ++i) {
    TORCH_CHECK_VALUE(wa[i][0] == workers_[i].rank, "ShardServer.restore: the checkpoint's worker ",
                      i, " is rank ", wa[i][0], ", this server's rank ", workers_[i].rank);
  }
  shard_.copy_(state.shard);
  momentum_buffer_ = state.momentum_buffer.defined() ? state.momentum_buffer.clone() : at::Tensor();
  version_ = state.version;
  for (size_t i = 0; i < workers_.size(); ++i) {
    auto& w = workers_[i];
    w.clock = wa[i][1];
    w.live = true;  // expected back; Note [Rejoining workers]
    w.dead = false;
    w.pulled_round = -1;
  }
  log_.clear();
  auto la = state.log.accessor<int64_t, 2>();
  for (int64_t i = 0; i < state.log.size(0); ++i) {
    log_.push_back(ApplyRecord{la[i][0], la[i][1], la[i][2], la[i][3], la[i][4]});
  }
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
