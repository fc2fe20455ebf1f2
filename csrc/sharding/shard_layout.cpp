#include "sharding/shard_layout.hpp"

#include <c10/util/Exception.h>

namespace torchlane::sharding {

ShardLayout shard_layout(const std::vector<int64_t>& numels, int64_t world_size) {
  TORCH_CHECK_VALUE(world_size >= 1, "world_size must be >= 1, got ", world_size);
  ShardLayout layout;
  layout.offsets.reserve(numels.size());
  for (const auto n : numels) {
    TORCH_CHECK_VALUE(n >= 0, "a parameter numel must be >= 0, got ", n);
    layout.offsets.push_back(layout.numel);
    layout.numel += n;
  }
  // At least one element per rank, so that an all-empty bucket still has a valid shard.
  layout.shard_numel = std::max<int64_t>(1, (layout.numel + world_size - 1) / world_size);
  layout.padded_numel = layout.shard_numel * world_size;
  return layout;
}

}  // namespace torchlane::sharding
