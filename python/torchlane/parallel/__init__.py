"""torchlane.parallel: model parallelism composed with torchlane's data parallelism on a mesh.

    mesh = torchlane.parallel.init_mesh(dp=2, tp=2)            # (pp, dp, tp) DeviceMesh
    tensor_parallel(model, mesh["tp"], plan)                    # swaps Linear/Embedding in place
    model = torchlane.DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    pipe = pipeline(layers, mesh, n_microbatches=8, schedule="1f1b")   # pipeline stages over "pp"

See docs/tensor_parallel.md and docs/pipeline_parallel.md.
"""

from torchlane.parallel.layers import (  # noqa: F401
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torchlane.parallel.mesh import init_mesh  # noqa: F401
from torchlane.parallel.pipeline import Pipeline, pipeline  # noqa: F401
from torchlane.parallel.tensor import (  # noqa: F401
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    ShardAttribute,
    SplitSequence,
    VocabParallel,
    clip_grad_norm_,
    full_state_dict,
    load_full_state_dict,
    tensor_parallel,
)
