"""Small models shared by the tests; each exercises one thing DDP must get right."""

import dataclasses

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=12, hidden=32, d_out=4, layers=3):
        super().__init__()
        dims = [d_in] + [hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class ConvBN(nn.Module):
    """A conv net whose BatchNorm running statistics are buffers DDP broadcasts."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class TiedTransformer(nn.Module):
    """One pre-norm transformer block with the output projection tied to the embedding."""

    def __init__(self, vocab=32, dim=16, heads=2, seq=8):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.block = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        x = self.block(self.tok(idx) + self.pos(pos), src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


class Frozen(MLP):
    def __init__(self):
        super().__init__()
        for p in self.layers[0].parameters():
            p.requires_grad_(False)


class WithUnused(nn.Module):
    """`unused` never takes part in forward; `side` feeds an output that may be left out of the
    loss."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(12, 16)
        self.main = nn.Linear(16, 4)
        self.side = nn.Linear(16, 2)
        self.unused = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.main(h)


class MixedDtype(nn.Module):
    """fp32 and bf16 parameters: they must land in separate buckets."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(16, 16).to(torch.bfloat16)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x)).to(torch.bfloat16)
        h = torch.relu(self.b(h)).to(torch.float32)
        return self.c(h)


class Reordered(nn.Module):
    """Registered in the order c, b, a but used a -> b -> c, so the gradient-ready order is the
    registration order, not its reverse: the bucket rebuild must change the buckets."""

    def __init__(self):
        super().__init__()
        self.c = nn.Linear(32, 4)
        self.b = nn.Linear(32, 32)
        self.a = nn.Linear(12, 32)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@dataclasses.dataclass
class Out:
    main: torch.Tensor
    side: torch.Tensor


class MultiOutput(WithUnused):
    """Returns (main, side) as a tuple, a dict or a dataclass."""

    def __init__(self, kind="tuple"):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        main, side = self.main(h), self.side(h)
        if self.kind == "dict":
            return {"main": main, "side": side}
        if self.kind == "dataclass":
            return Out(main, side)
        return main, side


MODELS = {
    "mlp": MLP,
    "convbn": ConvBN,
    "transformer": TiedTransformer,
    "frozen": Frozen,
    "unused": WithUnused,
    "mixed": MixedDtype,
    "reordered": Reordered,
}


def make_model(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MODELS[name](**kwargs)


def batch(name, step, global_batch, seed=1234):
    """The global batch of one step (inputs, targets), identical in every process."""
    g = torch.Generator().manual_seed(seed + step)
    if name == "convbn":
        x = torch.randn(global_batch, 3, 6, 6, generator=g)
        return x, torch.randn(global_batch, 4, generator=g)
    if name == "transformer":
        idx = torch.randint(0, 32, (global_batch, 8), generator=g)
        return idx, torch.randint(0, 32, (global_batch, 8), generator=g)
    return torch.randn(global_batch, 12, generator=g), torch.randn(global_batch, 4, generator=g)


def loss_fn(name, out, y):
    if name == "transformer":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.mse_loss(out.float(), y)
