"""Python face of csrc/parallel/: the region-boundary autograd functions (Note [Tensor-parallel
regions] in csrc/parallel/region_comm.hpp) and the plain collectives they are built from."""

from torchlane import _C

copy_to_region = _C.tp_copy_to_region  # identity / all-reduce
reduce_from_region = _C.tp_reduce_from_region  # all-reduce / identity
scatter_to_region = _C.tp_scatter_to_region  # own chunk / all-gather
gather_from_region = _C.tp_gather_from_region  # all-gather / own chunk
gather_from_sequence_region = _C.tp_gather_from_sequence_region  # all-gather / reduce-scatter
reduce_scatter_to_sequence_region = _C.tp_reduce_scatter_to_sequence_region  # r-s / all-gather
column_parallel_linear = _C.tp_column_parallel_linear  # Note [Overlapped column backward]
all_reduce = _C.tp_all_reduce  # no autograd; op "sum" or "max"; returns a new tensor
all_gather = _C.tp_all_gather  # no autograd
reduce_scatter = _C.tp_reduce_scatter  # no autograd
