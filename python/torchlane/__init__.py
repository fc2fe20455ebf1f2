"""torchlane: data-parallel training for PyTorch.

    model = torchlane.DistributedDataParallel(model)     # drop-in for torch DDP
    out = torchlane.attention(q, k, v, causal=True)       # fused flash-style attention
"""

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from torchlane import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "torchlane's C++ extension torchlane._C is not built or does not match the installed "
        "torch. Build it from the repository root with `make build` (or "
        "`pip install --no-build-isolation -e .`), then import torchlane again. "
        f"Original error: {e}"
    ) from e

__version__ = "0.1.0"

import os as _os  # noqa: E402

# The CMake package of the C++ API (docs/cpp_api.md), like torch.utils.cmake_prefix_path:
#   cmake -DCMAKE_PREFIX_PATH="<torch's>;<this>" ... then find_package(torchlane) gives
# torchlane::torchlane, the lib/libtorchlane.so this package's _C links.
cmake_prefix_path = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "share", "cmake")

# Drops the c10d Work objects of torchlane's last collectives on this thread before the
# interpreter finalizes, after Gloo's worker thread has let go of them (Note [Releasing
# collectives' Work objects] in csrc/comm/kept_works.hpp): left to the worker thread during
# finalization, their destruction aborts the process.
import atexit  # noqa: E402

atexit.register(_C._release_kept_works, 10.0)

# One line per concept, each module owning its part of the API.
from torchlane import (  # noqa: E402, F401
    _testing,
    checkpoint,
    data,  # noqa: E402, F401
    hooks,
    nn,
)
from torchlane._sharding_dcp import ShardedCheckpoint  # noqa: E402, F401
from torchlane.async_ import DiLoCo, LocalSGD, ps  # noqa: E402, F401
from torchlane.attention import attention, varlen_attention  # noqa: E402, F401
from torchlane.autotune import BucketAutotune  # noqa: E402, F401
from torchlane.ddp import DistributedDataParallel  # noqa: E402, F401
from torchlane.sharding import (  # noqa: E402, F401
    MixedPrecision,
    ShardedDataParallel,
    ShardedOptimizer,
)
