#include "reducer/bucket_plan.hpp"

#include <algorithm>
#include <map>
#include <tuple>

#include <c10/util/Exception.h>

namespace torchlane {

namespace {

using GroupKey = std::tuple<int, int, int>;  // (dtype, device type, device index)

GroupKey group_key(const TensorMeta& t) {
  return {static_cast<int>(t.dtype), static_cast<int>(t.device.type()),
          static_cast<int>(t.device.index())};
}

struct OpenBucket {
  std::vector<int64_t> members;
  int64_t bytes = 0;
  int64_t first_position = 0;  // position of the first member in `order`
  int closed_so_far = 0;       // buckets this group already closed (0 -> first-bucket cap)
};

}  // namespace

std::vector<std::vector<int64_t>> compute_bucket_assignment(const std::vector<TensorMeta>& tensors,
                                                            const std::vector<int64_t>& order,
                                                            int64_t first_cap_bytes,
                                                            int64_t cap_bytes) {
  TORCH_CHECK(first_cap_bytes > 0 && cap_bytes > 0,
              "bucket caps must be positive, got first_cap_bytes=", first_cap_bytes,
              " cap_bytes=", cap_bytes);
  const auto n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(static_cast<int64_t>(order.size()) == n, "order has ", order.size(), " entries for ",
              n, " tensors");
  std::vector<char> seen(n, 0);
  std::map<GroupKey, OpenBucket> open;
  std::vector<std::pair<int64_t, std::vector<int64_t>>> closed;  // (first position, members)

  for (int64_t pos = 0; pos < n; ++pos) {
    const int64_t idx = order[pos];
    TORCH_CHECK(idx >= 0 && idx < n, "order[", pos, "] = ", idx, " is out of range [0, ", n, ")");
    TORCH_CHECK(!seen[idx], "order lists tensor ", idx, " twice");
    seen[idx] = 1;
    if (tensors[idx].own_bucket) {
      closed.emplace_back(pos, std::vector<int64_t>{idx});
      continue;
    }
    auto& bucket = open[group_key(tensors[idx])];
    if (bucket.members.empty()) {
      bucket.first_position = pos;
    }
    bucket.members.push_back(idx);
    bucket.bytes += tensors[idx].bytes;
    const int64_t cap = bucket.closed_so_far == 0 ? first_cap_bytes : cap_bytes;
    if (bucket.bytes >= cap) {
      closed.emplace_back(bucket.first_position, std::move(bucket.members));
      bucket.members.clear();
      bucket.bytes = 0;
      bucket.closed_so_far += 1;
    }
  }
  for (auto& [key, bucket] : open) {
    if (!bucket.members.empty()) {
      closed.emplace_back(bucket.first_position, std::move(bucket.members));
    }
  }
  std::sort(closed.begin(), closed.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<std::vector<int64_t>> result;
  result.reserve(closed.size());
  for (auto& [pos, members] : closed) {
    result.push_back(std::move(members));
  }
  return result;
}

}  // namespace torchlane
