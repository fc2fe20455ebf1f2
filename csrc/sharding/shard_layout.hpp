#pragma once
// Pure layout arithmetic of a sharded flat bucket. See Note [Sharded flat bucket].
#include <cstdint>
#include <vector>

namespace torchlane::sharding {

// Note [Sharded flat bucket]
// A bucket of the reducer's plan (Note [Bucket assignment]: one dtype and device, parameters in
// expected gradient-ready order) becomes one flat tensor: its parameters back to back at
// `offsets`, followed by zero padding up to `padded_numel`, the smallest multiple of the world
// size that holds them all. Rank r owns elements [r * shard_numel, (r + 1) * shard_numel): every
// rank's shard has the same length, which is what reduce_scatter_single / all_gather_single
// require, and a parameter may straddle two shards. The padding stays zero in gradients (it is
// never written) and in parameters (the optimizer's update of a zero-gradient element with zero
// value is zero for the optimizers torch ships, except weight decay of a zero, which is zero).
struct ShardLayout {
  std::vector<int64_t> offsets;  // start of each parameter in the flat bucket
  int64_t numel = 0;             // sum of the parameters' numel
  int64_t padded_numel = 0;      // numel rounded up to a multiple of world_size (at least 1 each)
  int64_t shard_numel = 0;       // padded_numel / world_size
};

ShardLayout shard_layout(const std::vector<int64_t>& numels, int64_t world_size);

}  // namespace torchlane::sharding
