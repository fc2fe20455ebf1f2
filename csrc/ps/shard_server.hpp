#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace torchlane::ps {

// The outer optimizer a server applies to each pushed pseudo-gradient: torch.optim.SGD's update
// (momentum without dampening, optional Nesterov), on the server's flat shard.
struct OuterOptions {
  double lr = 1.0;
  double momentum = 0.0;
  bool nesterov = false;
};

// One line of the server's log: an update as it was applied.
struct ApplyRecord {
  int64_t worker;        // rank that pushed it
  int64_t round;         // the worker's round (its clock when it pulled the parameters)
  int64_t staleness;     // round minus the slowest live worker's clock at that pull
  int64_t base_version;  // the shard version the worker pulled
  int64_t version;       // the shard version this update produced
};

// Note [Bounded staleness]
// Each worker has a clock: the number of its updates this server has applied. A worker that has
// pushed round c and asks for parameters for round c + 1 gets them only when
// c + 1 - min(clock of the live workers) <= max_staleness (stale synchronous parallel, Ho et al.
// 2013): it may run at most max_staleness rounds ahead of the slowest live worker, so every
// update it computes misses at most max_staleness rounds of anyone. max_staleness = 0 makes
// the workers move in lockstep (BSP-like: every round starts from the parameters after all
// workers' previous rounds); no bound (std::nullopt) is fully asynchronous (ASP). Workers that
// left or died no longer count in the minimum, so a dead worker never blocks the others; an
// update that was applied stays applied.

// Note [Rejoining workers]
// A worker that comes back (a restarted process, or a live one whose link to this server broke)
// is live again with no parameters: it must pull before it pushes. Its clock is raised to the
// slowest other live worker's clock, so the bound neither holds the others back until the
// newcomer catches up nor holds the newcomer back; the rounds it missed are simply not
// computed (as with any asynchronous worker that was slow). A restarted server (restore()) has
// the clocks of its checkpoint and counts every worker as live, whether it had left or died
// before: it cannot tell which of them a restarted job brings back. Each must pull first; one
// that does not come back is dropped after the heartbeat timeout.
class ShardServer {
 public:
  ShardServer(at::Tensor shard, OuterOptions options, std::optional<int64_t> max_staleness,
              std::vector<int64_t> workers);

  // Whether `worker` may be sent the parameters now (see Note [Bounded staleness]).
  bool may_pull(int64_t worker) const;
  // Records that `worker` was sent the current parameters; returns their version.
  int64_t record_pull(int64_t worker);
  // Applies `worker`'s pseudo-gradient (pulled minus its local parameters) to the shard.
  int64_t apply(int64_t worker, const at::Tensor& update);
  // A worker that finished (left = true) or stopped answering: no longer waited for.
  void remove(int64_t worker, bool left);
  // A worker (a restarted process, or the same one after its link broke) that is back: live
  // again, holding no parameters until it pulls (Note [Rejoining workers]).
  void rejoin(int64_t worker);

  // The whole state, for the server's checkpoint: per worker [rank, clock, live, dead], and per
  // log line [worker, round, staleness, base_version, version] (int64 tensors).
  struct State {
    at::Tensor shard;
    at::Tensor momentum_buffer;  // undefined until the first update with momentum
    int64_t version;
    at::Tensor workers;
    at::Tensor log;
  };
  State state() const;
  // Restores a state() of a server over the same shard size and worker ranks. Every worker
  // is live and must pull again (a restarted server sent nothing yet).
  void restore(const State& state);

  const at::Tensor& shard() const {
    return shard_;
  }
  int64_t version() const {
    return version_;
  }
  const std::vector<ApplyRecord>& log() const {
    return log_;
  }
  std::vector<int64_t> live_workers() const;
  std::vector<int64_t> dead_workers() const;

 private:
  struct Worker {
    int64_t rank;
    int64_t clock = 0;
    int64_t pulled_round = -1;  // -1: holds no parameters to compute on
    int64_t pulled_staleness = 0;
    int64_t pulled_version = 0;
    bool live = true;
    bool dead = false;
  };
  Worker& find(int64_t worker, const char* what);
  const Worker& find(int64_t worker, const char* what) const;
  int64_t min_live_clock() const;

  at::Tensor shard_;
  at::Tensor momentum_buffer_;
  OuterOptions options_;
  std::optional<int64_t> max_staleness_;
  std::vector<Worker> workers_;
  int64_t version_ = 0;
  std::vector<ApplyRecord> log_;
};

}  // namespace torchlane::ps
