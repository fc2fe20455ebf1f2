#pragma once
// Tensor-parallel region boundaries: the collectives at the edges of a model-parallel region and
// the autograd functions that pair each with its backward dual. See Note [Tensor-parallel regions].
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torchlane::parallel {

using ProcessGroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

// Note [Tensor-parallel regions]
// A tensor-parallel layer pair (column-parallel -> row-parallel, Megatron-LM style) is a region
// whose inside holds each rank's shard of the activations and whose outside holds the full,
// replicated activations. Crossing the boundary is one collective forward and its dual backward:
//
//   copy_to_region        forward identity              backward all-reduce (sum)
//   reduce_from_region    forward all-reduce (sum)      backward identity
//   scatter_to_region     forward keep own chunk (dim)  backward all-gather (dim)
//   gather_from_region    forward all-gather (dim)      backward keep own chunk (dim)
// and with sequence parallelism, where the outside is sharded along the sequence instead of
// replicated (the all-reduce split into its two halves):
//   gather_from_sequence_region   forward all-gather (dim)   backward reduce-scatter (dim)
//   reduce_scatter_to_sequence    forward reduce-scatter (dim) backward all-gather (dim)
//
// The duals follow from the forward being linear: the adjoint of "copy x to every rank" is "sum
// the ranks' gradients", the adjoint of an all-gather is the reduce-scatter of the gradient (each
// rank's chunk received contributions from every rank's use of the gathered tensor), and when the
// gathered tensor is used identically on every rank (gather_from_region: the ranks' gradients
// are equal), keeping one's own chunk is the adjoint instead.
//
// Every collective is a c10d ProcessGroup call on one contiguous buffer holding the ranks'
// chunks as consecutive blocks along dim 0, so that any `dim` maps to the flat all-gather /
// reduce-scatter (all_gather_single / reduce_scatter_single, formerly _allgather_base /
// _reduce_scatter_base; both exist on Gloo as of torch 2.13, and on NCCL). A group of size 1 makes
// every function the identity. The Work of each collective goes through comm::keep (Note [Releasing
// collectives' Work objects]) and is waited on directly: Gloo's reduce_scatter_single Work has no
// future.

// Plain collectives (no autograd): the building blocks, also used by vocab-parallel cross-entropy.
// all_reduce returns a new tensor (sum, or max when `max` is true); the input is not modified.
at::Tensor all_reduce(const at::Tensor& x, const ProcessGroupPtr& pg, bool max = false);
at::Tensor all_gather(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim);
at::Tensor reduce_scatter(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim);
// The (input, output) buffers of a flat reduce-scatter of x's n chunks along dim.
std::pair<at::Tensor, at::Tensor> stacked_chunks_output(const at::Tensor& x, int64_t n,
                                                        int64_t dim);
at::Tensor own_chunk(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim);

// The autograd functions of Note [Tensor-parallel regions].
at::Tensor copy_to_region(const at::Tensor& x, const ProcessGroupPtr& pg);
at::Tensor reduce_from_region(const at::Tensor& x, const ProcessGroupPtr& pg);
at::Tensor scatter_to_region(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim);
at::Tensor gather_from_region(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim);
at::Tensor gather_from_sequence_region(const at::Tensor& x, const ProcessGroupPtr& pg, int64_t dim);
at::Tensor reduce_scatter_to_sequence_region(const at::Tensor& x, const ProcessGroupPtr& pg,
                                             int64_t dim);

}  // namespace torchlane::parallel
