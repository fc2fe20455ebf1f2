"""Cases of tests/test_tensor_parallel.py, run on every rank by tests/dist.py.

Each compares a tensor-parallel (x data-parallel) run with the single-process model on the same
global batch, computed on the same rank from the same initial weights: forward output, loss,
every parameter's gradient (gathered to its full shape), then a few AdamW steps.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import torchlane  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from gpt_tp import parallelize_gpt  # noqa: E402
from torchlane import parallel as tlp  # noqa: E402
from torchlane.parallel import comm  # noqa: E402
from torchlane.parallel.layers import unshard  # noqa: E402
from torchlane.parallel.tensor import _sharded  # noqa: E402

TOLERANCES = FWD_REL, STEP_REL, PARAM_REL, KEY_BIAS_REL = 1e-5, 1e-4, 1e-3, 1e-2
# float64: the same run agrees to rounding (measured: gradients 1e-15, parameters after 6 AdamW
# steps 3e-12), so the fp32 parameter tolerances above cover rounding noise amplified by AdamW,
# not a difference in the math.
F64_REL = 1e-10


def close(actual, expected, rel, what):
    """max |actual - expected| <= rel * max |expected| (relative to the tensor's scale)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3g}, scale {scale:.3g}"
    return err / max(scale, 1e-30)


def full_grads(model):
    """{name: unsharded gradient} (a collective over the tp group)."""
    grads = {n: p.grad for n, p in model.named_parameters()}
    for key, mod, pname, dim, parts in _sharded(model):
        if key in grads:
            grads[key] = unshard(getattr(mod, pname).grad, dim, parts, mod.process_group)
    return grads


def replicated_identical(model, group):
    """Every unsharded parameter and its gradient are bitwise equal across the tp group."""
    sharded = {id(getattr(m, p)) for _, m, p, _, _ in _sharded(model)}
    for name, p in model.named_parameters():
        if id(p) in sharded:
            continue
        for what, t in (("value", p), ("grad", p.grad)):
            if t is None:
                continue
            parts = comm.all_gather(t.detach().unsqueeze(0).contiguous(), group, 0)
            for r in range(1, parts.size(0)):
                assert torch.equal(parts[r], parts[0]), f"{name} {what} differs across tp ranks"


def gpt_cfg(n_head=4, attention="torchlane"):
    return GPTConfig(64, 8, 2, n_head, 32, 0.0, attention)


def batches(steps, batch=4, seq=8, vocab=64):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randint(0, vocab, (batch, seq), generator=g),
            torch.randint(0, vocab, (batch, seq), generator=g),
        )
        for _ in range(steps)
    ]


def gpt_case(dp, tp, sp, steps, dtype=torch.float32):
    """(dp, tp) GPT vs the one-process GPT on the global batch; returns the worst relative
    errors (forward, grads, steps). In float64 every tolerance is F64_REL."""
    mesh = tlp.init_mesh(dp=dp, tp=tp)
    tp_group, dp_group = mesh["tp"].get_group(), mesh["dp"].get_group()
    dp_rank = mesh["dp"].get_local_rank()
    torch.manual_seed(0)
    ref = GPT(gpt_cfg()).to(dtype)
    f64 = dtype == torch.float64
    if f64:  # GPT's loss is computed in fp32; keep the float64 reference float64 throughout
        ref.cross_entropy = lambda logits, t: F.cross_entropy(logits.flatten(0, -2), t.flatten())
    FWD_REL, STEP_REL, PARAM_REL, KEY_BIAS_REL = (F64_REL,) * 4 if f64 else TOLERANCES
    model = parallelize_gpt(copy.deepcopy(ref), mesh["tp"], sequence_parallel=sp)
    assert model.head.weight is model.tok_emb.weight  # the tie survives sharding
    ddp = torchlane.DistributedDataParallel(model, process_group=dp_group) if dp > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    worst = {"forward": 0.0, "grads": 0.0, "steps": 0.0}
    for step, (x, y) in enumerate(batches(steps)):
        rows = slice(dp_rank * x.size(0) // dp, (dp_rank + 1) * x.size(0) // dp)
        logits, loss = ddp(x[rows], y[rows])
        ref_logits, ref_loss = ref(x, y)
        global_loss = comm.all_reduce(loss.detach().reshape(1), dp_group).reshape(()) / dp
        rel = FWD_REL if step == 0 else STEP_REL
        key = "forward" if step == 0 else "steps"
        worst[key] = max(worst[key], close(global_loss, ref_loss, rel, f"loss at step {step}"))
        if step == 0:
            full_logits = comm.all_gather(logits.detach().contiguous(), tp_group, -1)
            close(full_logits, ref_logits[rows], FWD_REL, "logits")
        loss.backward()
        ref_loss.backward()
        if step == 0:
            grads = full_grads(model)
            for name, g in ref.named_parameters():
                worst["grads"] = max(
                    worst["grads"], close(grads[name], g.grad, FWD_REL, f"grad of {name}")
                )
            replicated_identical(model, tp_group)
        norm = tlp.clip_grad_norm_(model, 1.0)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        close(norm, ref_norm, STEP_REL, f"grad norm at step {step}")
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    replicated_identical(model, tp_group)
    # Parameters after the steps (the losses above agree to STEP_REL): AdamW divides each
    # gradient element by its running RMS, so elements with near-zero gradients move by rounding
    # noise scaled up towards lr, in both runs alike but with different noise; hence PARAM_REL,
    # and KEY_BIAS_REL for the q/k/v bias, whose key part has an analytically zero gradient
    # (softmax ignores a per-query constant).
    full = tlp.full_state_dict(model)
    for name, t in ref.state_dict().items():
        rel = KEY_BIAS_REL if name.endswith("qkv.bias") else PARAM_REL
        err = close(full[name], t, rel, f"{name} after steps")
        if rel == PARAM_REL:
            worst["params"] = max(worst.get("params", 0.0), err)
    # The full state dict loads into a freshly initialised model of this tp size.
    torch.manual_seed(123)
    other = parallelize_gpt(GPT(gpt_cfg()).to(dtype), mesh["tp"], sequence_parallel=sp)
    tlp.load_full_state_dict(other, ref.state_dict())
    x, y = batches(1)[0]
    close(other(x, y)[1], ref(x, y)[1], FWD_REL, "loss after load_full_state_dict")
    return worst


class GQAAttention(nn.Module):
    """Grouped-query attention with a fused q/k/v projection of unequal parts."""

    def __init__(self, e=32, n_head=4, n_kv_head=2):
        super().__init__()
        self.n_head, self.n_kv_head, self.d = n_head, n_kv_head, e // n_head
        self.qkv = nn.Linear(e, (n_head + 2 * n_kv_head) * self.d)
        self.o = nn.Linear(n_head * self.d, e)

    def forward(self, x):
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        h, hkv, d = self.n_head, self.n_kv_head, self.d
        q, k, v = qkv.split((h * d, hkv * d, hkv * d), dim=-1)
        q = q.view(b, s, h, d).transpose(1, 2)
        k, v = (t.view(b, s, hkv, d).transpose(1, 2) for t in (k, v))
        y = torchlane.attention(q, k, v, causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, h * d))


class GQABlock(nn.Module):
    def __init__(self, n_kv_head=2):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.attn = GQAAttention(n_kv_head=n_kv_head)

    def forward(self, x):
        return x + self.attn(self.ln(x))


def gqa_plan(sp):
    d, h, hkv = 8, 4, 2
    plan = {
        "attn.qkv": tlp.ColwiseParallel(parts=(h * d, hkv * d, hkv * d), sequence_parallel=sp),
        "attn.o": tlp.RowwiseParallel(sequence_parallel=sp),
        "attn": [tlp.ShardAttribute("n_head"), tlp.ShardAttribute("n_kv_head")],
    }
    if sp:
        plan["ln"] = tlp.SequenceParallel()
    return plan


def gqa_case(group, sp):
    torch.manual_seed(2)
    ref = GQABlock()
    model = tlp.tensor_parallel(copy.deepcopy(ref), group, gqa_plan(sp))
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3))
    xl = comm.scatter_to_region(x, group, 1) if sp else x
    out = model(xl)
    ref_out = ref(x)
    full = comm.all_gather(out.detach(), group, 1) if sp else out
    close(full, ref_out, FWD_REL, f"GQA output (sp={sp})")
    g = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(4))
    gl = comm.scatter_to_region(g, group, 1) if sp else g
    (out * gl).sum().backward()
    (ref_out * g).sum().backward()
    grads = full_grads(model)
    for name, p in ref.named_parameters():
        close(grads[name], p.grad, FWD_REL, f"GQA grad of {name} (sp={sp})")


def matmul_case(group):
    """Y = X W split three ways: rows of X (data parallel), columns of W, rows of W."""
    n, r = group.size(), group.rank()
    g = torch.Generator().manual_seed(5)
    X, W, G = (torch.randn(*s, generator=g) for s in ((8, 6), (6, 4), (8, 4)))
    Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
    Y = Xr @ Wr
    (Y * G).sum().backward()

    # Rows of X: each rank multiplies its rows; dW is summed across ranks (DDP's all-reduce).
    Xi = X.chunk(n)[r].clone().requires_grad_()
    Wl = W.clone().requires_grad_()
    Yi = Xi @ Wl
    (Yi * G.chunk(n)[r]).sum().backward()
    close(comm.all_gather(Yi.detach(), group, 0), Y, FWD_REL, "rows of X: Y")
    close(comm.all_gather(Xi.grad, group, 0), Xr.grad, FWD_REL, "rows of X: dX")
    close(comm.all_reduce(Wl.grad, group), Wr.grad, FWD_REL, "rows of X: dW")

    for name, make in (
        ("columns of W", lambda lin: tlp.ColumnParallelLinear(lin, group, gather_output=True)),
        ("rows of W", lambda lin: tlp.RowParallelLinear(lin, group, input_is_parallel=False)),
    ):
        lin = nn.Linear(6, 4, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W.t())
        layer = make(lin)
        Xc = X.clone().requires_grad_()
        Yc = layer(Xc)
        (Yc * G).sum().backward()
        close(Yc, Y, FWD_REL, f"{name}: Y")
        close(Xc.grad, Xr.grad, FWD_REL, f"{name}: dX")
        (dim, parts) = layer.tp_shards["weight"]
        close(unshard(layer.weight.grad, dim, parts, group).t(), Wr.grad, FWD_REL, f"{name}: dW")


def errors_case(group):
    import pytest

    world = dist.get_world_size()
    with pytest.raises(ValueError, match=r"dp \(2\) x tp \(2\) x pp \(1\) = 4 does not match"):
        tlp.init_mesh(dp=2, tp=2)
    with pytest.raises(ValueError, match="init_mesh: tp must be >= 1, got 0"):
        tlp.init_mesh(tp=0)
    with pytest.raises(TypeError, match="init_mesh: tp must be an int, got 2.0"):
        tlp.init_mesh(tp=2.0)
    with pytest.raises(ValueError, match=f"world size {world} is not divisible by tp"):
        tlp.init_mesh(tp=3)
    with pytest.raises(ValueError, match=r"n_head \(3\) must be divisible by tp \(2\)"):
        parallelize_gpt(GPT(GPTConfig(64, 8, 1, 3, 48, 0.0, "sdpa")), group)
    with pytest.raises(ValueError, match=r"n_embd \(33\) must be divisible by tp \(2\)"):
        parallelize_gpt(GPT(GPTConfig(64, 8, 1, 1, 33, 0.0, "sdpa")), group)
    with pytest.raises(ValueError, match=r"vocab_size \(65\) must be divisible by tp \(2\)"):
        parallelize_gpt(GPT(GPTConfig(65, 8, 1, 2, 32, 0.0, "sdpa")), group)
    with pytest.raises(ValueError, match=r"out_features \(5\) must be divisible"):
        tlp.ColumnParallelLinear(nn.Linear(4, 5), group)
    with pytest.raises(ValueError, match=r"in_features \(5\) must be divisible"):
        tlp.RowParallelLinear(nn.Linear(5, 4), group)
    with pytest.raises(ValueError, match=r"num_embeddings .* \(65\) must be divisible"):
        tlp.VocabParallelEmbedding(nn.Embedding(65, 8), group)
    with pytest.raises(ValueError, match=r"attn.n_kv_head \(1\) must be divisible"):
        tlp.tensor_parallel(GQABlock(n_kv_head=1), group, {"attn": tlp.ShardAttribute("n_kv_head")})
    with pytest.raises(ValueError, match="matches no module"):
        tlp.tensor_parallel(GQABlock(), group, {"attn.nothing": tlp.ColwiseParallel()})
    with pytest.raises(TypeError, match="must be a style"):
        tlp.tensor_parallel(GQABlock(), group, {"attn.o": "rowwise"})
    # The C++ region functions check their arguments.
    with pytest.raises(ValueError, match="0-dimensional tensor"):
        comm.gather_from_region(torch.zeros(()), group, 0)
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 2\)"):
        comm.scatter_to_region(torch.zeros(2, 2), group, 2)
    with pytest.raises(ValueError, match="op must be 'sum' or 'max'"):
        comm.all_reduce(torch.zeros(2), group, "min")
    with pytest.raises(ValueError, match="seq_dim 2 is not a dimension other than the feature"):
        comm.column_parallel_linear(torch.zeros(1, 2, 4), torch.zeros(2, 4), None, group, True, 2)
    # Sequence parallelism with a sequence that does not split evenly.
    sp_model = parallelize_gpt(GPT(gpt_cfg()), group, sequence_parallel=True)
    with pytest.raises(ValueError, match="must be divisible by the process group size 2"):
        sp_model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(IndexError, match=r"ids must be in \[0, 64\), got values in \[0, 64\]"):
        sp_model(torch.tensor([[0, 64]]))
    with pytest.raises(IndexError, match=r"targets must be in \[0, 64\)"):
        tlp.vocab_parallel_cross_entropy(torch.zeros(3, 32), torch.tensor([0, 1, 70]), group)
    with pytest.raises(ValueError, match="shape .* expected the unsharded shape"):
        tlp.load_full_state_dict(sp_model, {"tok_emb.weight": torch.zeros(32, 32)}, strict=False)


def two_ranks(rank, world):
    tp_group = dist.group.WORLD
    out = {}
    for sp in (False, True):
        out[f"gpt(1,2) sp={sp}"] = gpt_case(1, 2, sp, steps=6)
        gqa_case(tp_group, sp)
    out["gpt(1,2) sp=True float64"] = gpt_case(1, 2, True, steps=6, dtype=torch.float64)
    matmul_case(tp_group)
    errors_case(tp_group)
    return out


def four_ranks(rank, world):
    out = {}
    for dp, tp in ((2, 2), (1, 4)):
        for sp in (False, True):
            out[f"gpt({dp},{tp}) sp={sp}"] = gpt_case(dp, tp, sp, steps=6)
    return out
