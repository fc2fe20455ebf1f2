#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace torchlane {

// What bucket assignment needs to know about one parameter.
struct TensorMeta {
  int64_t bytes;
  c10::ScalarType dtype;
  c10::Device device;
  bool own_bucket = false;  // a sparse gradient: see Note [Sparse gradients] (reducer.cpp)
};

// Note [Bucket assignment]
// Parameters are walked in `order` (reverse registration order at construction, the observed
// gradient-ready order after the first iteration; see Note [Bucket rebuild]). Parameters of
// different (dtype, device) never share a bucket, since a bucket is one flat tensor. Each
// (dtype, device) group fills one open bucket at a time and closes it once it holds at least its
// cap: the group's first bucket uses `first_cap_bytes` (small, so that the first all-reduce
// starts early in backward), later ones `cap_bytes`. A single parameter larger than the cap gets a
// bucket of its own, and so does a parameter marked own_bucket (a sparse gradient is a tensor of
// its own, never a slice of a flat buffer; torch DDP does the same). Buckets are returned in the
// order of their first parameter in `order`, which is the order they are expected to become ready
// in and the order every rank launches them in.
std::vector<std::vector<int64_t>> compute_bucket_assignment(const std::vector<TensorMeta>& tensors,
                                                            const std::vector<int64_t>& order,
                                                            int64_t first_cap_bytes,
                                                            int64_t cap_bytes);

}  // namespace torchlane
