"""Bad inputs to torchlane.attention raise a clear exception that names the argument."""

import pytest
import torch

import torchlane


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


Q, KV = (2, 4, 8, 16), (2, 2, 8, 16)

CASES = [
    ("rank", (_t(4, 8, 16), _t(*KV), _t(*KV)), {}, ValueError, "q must be a 4-D tensor"),
    ("k rank", (_t(*Q), _t(2, 2, 8), _t(*KV)), {}, ValueError, "k must be a 4-D tensor"),
    ("batch", (_t(*Q), _t(3, 2, 8, 16), _t(3, 2, 8, 16)), {}, ValueError, "batch size"),
    ("head dim", (_t(*Q), _t(2, 2, 8, 32), _t(2, 2, 8, 32)), {}, ValueError, "head dim D=16"),
    ("v heads", (_t(*Q), _t(*KV), _t(2, 4, 8, 16)), {}, ValueError, "v must have k's number of heads"),
    ("v length", (_t(*Q), _t(*KV), _t(2, 2, 9, 16)), {}, ValueError, "v must have k's sequence length"),
    ("H % Hkv", (_t(*Q), _t(2, 3, 8, 16), _t(2, 3, 8, 16)), {}, ValueError, "multiple of the number of kv heads"),
    ("int dtype", (torch.ones(*Q, dtype=torch.int64),) * 3, {}, TypeError, "q must be a floating-point"),
    ("mixed dtype", (_t(*Q), _t(*KV, dtype=torch.bfloat16), _t(*KV)), {}, TypeError, "k must have q's dtype"),
    ("mixed device", (_t(*Q), _t(*KV, device="meta"), _t(*KV)), {}, ValueError, "k must be on q's device"),
    ("empty Sq", (_t(2, 4, 0, 16), _t(*KV), _t(*KV)), {}, ValueError, "empty"),
    ("empty Sk", (_t(*Q), _t(2, 2, 0, 16), _t(2, 2, 0, 16)), {}, ValueError, "at least one head and one key"),
    ("scale nan", (_t(*Q), _t(*KV), _t(*KV)), {"scale": float("nan")}, ValueError, "scale must be finite"),
    ("scale type", (_t(*Q), _t(*KV), _t(*KV)), {"scale": "big"}, TypeError, "scale must be a float"),
    ("causal type", (_t(*Q), _t(*KV), _t(*KV)), {"causal": 1}, TypeError, "causal must be a bool"),
    ("not a tensor", ([1.0], _t(*KV), _t(*KV)), {}, TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        torchlane.attention(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,exc,match", [c[1:] for c in CASES[:13]], ids=[c[0] for c in CASES[:13]])
def test_bad_input_raises_from_the_op(args, kwargs, exc, match):
    # The C++ checks, reached without the Python wrapper.
    scale = kwargs.get("scale", 0.25)
    with pytest.raises(exc, match=match):
        torch.ops.torchlane.attention_fwd(*args, False, scale)


def test_bad_backward_inputs():
    q, k, v = _t(*Q), _t(*KV), _t(*KV)
    out, lse = torch.ops.torchlane.attention_fwd(q, k, v, False, 0.25)
    with pytest.raises(ValueError, match="grad_out must match"):
        torch.ops.torchlane.attention_bwd(out[:, :2], None, q, k, v, out, lse, False, 0.25)
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.torchlane.attention_bwd(out, None, q, k, v, out, lse.double(), False, 0.25)
