#pragma once
// Selects ATen's vectorised CPU types for the attention kernels.
//
// Note [CPU vector width for the attention kernel]
// ATen's Vectorized<T> picks its implementation from the CPU_CAPABILITY_* macros that ATen's
// own build sets per dispatch target, not from the compiler's -m flags. An extension that does
// not set them gets the scalar fallback. The attention CPU kernel is one translation unit built
// with the extension's flags (-march=native, or -mavx2 in CUDA builds), so we map the compiler's
// target to the matching capability here. CPU_CAPABILITY is also the inline namespace name, so
// these instantiations never collide with another translation unit's generic ones.
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

// ATen's vector headers carry clang/unroll pragmas that gcc reports under -Wall.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop
