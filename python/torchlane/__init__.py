"""torchlane: data-parallel training for PyTorch.

    model = torchlane.DistributedDataParallel(model)     # drop-in for torch DDP
    out = torchlane.attention(q, k, v, causal=True)       # fused flash-style attention
"""

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

# ---- attention (issue 3) ----
from torchlane import nn  # noqa: E402, F401
from torchlane.attention import attention  # noqa: E402, F401
