#pragma once
// Runtime value -> compile-time constant, as flash-attention's static_switch.h.
#include <stdexcept>

#define TORCHLANE_HEADDIM_SWITCH(HEADDIM, ...)                                  \
  [&] {                                                                         \
    if ((HEADDIM) == 64) {                                                      \
      constexpr int kHeadDim = 64;                                              \
      return __VA_ARGS__();                                                     \
    } else if ((HEADDIM) == 128) {                                              \
      constexpr int kHeadDim = 128;                                             \
      return __VA_ARGS__();                                                     \
    }                                                                           \
    throw std::invalid_argument("flash attention kernels: head dim must be 64 or 128"); \
  }()
