// Note [CPU attention tuning knobs]
// Every tuning knob of the CPU attention kernels is read here from the environment; nothing else in
// csrc/attention/ calls getenv. They exist for tuning and tests: the defaults are what the kernels
// are built and measured for.
//
//   TORCHLANE_ATTN_CPU_BLOCKS="fwdM,fwdN,bwdM,bwdN[,bwdKCfloats]"   (read once per process)
//       tile sizes (Blocks below); the backward sizes of every kind are set together.
//   TORCHLANE_ATTN_CPU_BWD=kv_head|q_head|tile                      (read at every backward)
//       forces the packed backward's schedule (Note [Backward summation order]: all three give
//       bitwise the same gradients, so a test can compare them).
//
// Switches that tests flip at run time (micro-kernels vs BLAS tiles, AMX) are functions in
// cpu_microkernel.h, exposed as torchlane._testing.attention_cpu_*.
#pragma once

#include <cstdint>
#include <optional>

namespace torchlane::attention {

// Tile sizes: a fwd_m x fwd_n fp32 score tile plus the Q, K, V tiles stay within L2.
// The packed backward (attention_cpu_packed.cpp) uses bwd_m x bwd_n tiles and walks the keys in
// chunks holding about bwd_kc_floats floats of dK^T (and as many of dV^T), so that a chunk's
// accumulators and K^T / V^T stay in L2 across query tiles. fp32 with a causal mask uses the
// smaller bwd_causal_fp32_* tiles: with the large ones the masked half of every diagonal tile is
// computed for nothing, which costs more than the larger tiles gain. The BLAS tile kernels
// (attention_cpu.cpp) use blas_bwd_m x blas_bwd_n.
struct Blocks {
  int64_t fwd_m = 128, fwd_n = 256;
  int64_t bwd_m = 128, bwd_n = 256, bwd_kc_floats = 32768;
  int64_t bwd_causal_fp32_m = 64, bwd_causal_fp32_n = 128, bwd_causal_fp32_kc_floats = 65536;
  int64_t blas_bwd_m = 64, blas_bwd_n = 128;
};

const Blocks& blocks();

enum class BwdSchedule { KvHead, QHead, Tile };

// The schedule forced by TORCHLANE_ATTN_CPU_BWD, if any.
std::optional<BwdSchedule> forced_backward_schedule();

}  // namespace torchlane::attention
