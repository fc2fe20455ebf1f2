// See Note [CPU attention tuning knobs].
#include "attention/cpu_config.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace torchlane::attention {

const Blocks& blocks() {
  static const Blocks b = [] {
    Blocks r;
    if (const char* env = std::getenv("TORCHLANE_ATTN_CPU_BLOCKS")) {
      long v[5] = {0, 0, 0, 0, static_cast<long>(r.bwd_kc_floats)};
      const int n = std::sscanf(env, "%ld,%ld,%ld,%ld,%ld", &v[0], &v[1], &v[2], &v[3], &v[4]);
      if (n >= 4 && v[0] > 0 && v[1] > 0 && v[2] > 0 && v[3] > 0 && v[4] > 0) {
        r.fwd_m = v[0], r.fwd_n = v[1];
        r.bwd_m = r.bwd_causal_fp32_m = r.blas_bwd_m = v[2];
        r.bwd_n = r.bwd_causal_fp32_n = r.blas_bwd_n = v[3];
        r.bwd_kc_floats = r.bwd_causal_fp32_kc_floats = v[4];
      }
    }
    return r;
  }();
  return b;
}

std::optional<BwdSchedule> forced_backward_schedule() {
  const char* env = std::getenv("TORCHLANE_ATTN_CPU_BWD");
  if (!env)
    return std::nullopt;
  const std::string s(env);
  if (s == "kv_head")
    return BwdSchedule::KvHead;
  if (s == "q_head")
    return BwdSchedule::QHead;
  if (s == "tile")
    return BwdSchedule::Tile;
  return std::nullopt;
}

}  // namespace torchlane::attention
