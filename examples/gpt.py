"""A small GPT (decoder-only transformer): pre-norm blocks, tied input/output embeddings.

Used by examples/train_gpt.py and by the benchmarks, so the example and the README's numbers
train the same model. The attention backend is a constructor argument:

    "torchlane"  torchlane.attention(q, k, v, causal=True), the fused flash-style kernel
    "sdpa"       torch.nn.functional.scaled_dot_product_attention(is_causal=True)
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_BACKENDS = ("torchlane", "sdpa")


@dataclass
class GPTConfig:
    vocab_size: int = 256  # byte-level: any text file is a valid corpus
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    attention: str = "torchlane"

    def to_dict(self):
        return asdict(self)


def attention_fn(backend):
    """Return f(q, k, v) -> causal attention output, all of shape (B, H, S, D)."""
    if backend == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backend == "torchlane":
        import torchlane

        if not hasattr(torchlane, "attention"):
            raise RuntimeError(
                "attention='torchlane' needs torchlane.attention, which this build of torchlane "
                "does not have; use attention='sdpa' (--attention sdpa) or rebuild torchlane."
            )
        return lambda q, k, v: torchlane.attention(q, k, v, causal=True)
    raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
        self.n_head = cfg.n_head  # heads this module runs (n_head / tp under tensor parallelism)
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.attend = attention_fn(cfg.attention)

    def forward(self, x, cu_seqlens=None):
        # Sizes from qkv's output, not x: under tensor (and sequence) parallelism qkv returns
        # this rank's heads over the whole sequence (examples/gpt_tp.py).
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        h, d = self.n_head, self.head_dim
        q, k, v = qkv.split(h * d, dim=2)
        # (B, S, H*D) -> (B, H, S, D)
        q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in (q, k, v))
        if cu_seqlens is None:
            y = self.attend(q, k, v)
        else:  # packed rows: attention within each document (block-diagonal causal)
            import torchlane

            y = torch.stack(
                [torchlane.varlen_attention(q[i], k[i], v[i], cu_seqlens[i]) for i in range(b)]
            )
        y = y.transpose(1, 2).reshape(b, s, h * d)
        return self.drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x, cu_seqlens=None):
        x = x + self.attn(self.ln1(x), cu_seqlens)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied embeddings
        self.apply(self._init)
        # GPT-2's scaled init of the residual projections.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, pos=None, cu_seqlens=None):
        """pos and cu_seqlens (per row) for packed rows of several documents (--pack)."""
        b, s = idx.shape
        if s > self.cfg.block_size:
            raise ValueError(f"sequence length {s} exceeds block_size {self.cfg.block_size}")
        if pos is None:
            pos = torch.arange(s, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x, cu_seqlens)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, self.cross_entropy(logits, targets)

    def cross_entropy(self, logits, targets):
        """Mean next-token loss. Tensor parallelism (examples/gpt_tp.py) replaces it on the
        instance with the vocab-parallel loss of vocab-sharded logits."""
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.8, top_k=40, generator=None):
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.block_size :])[:, -1, :].float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def config_for_params(target_params, block_size=128, vocab_size=256, attention="sdpa"):
    """A GPTConfig whose parameter count is close to target_params (used by the size sweep).

    Width in steps of 64, head dim 64 (32 below n_embd 128), 2 to 8 layers; among the shapes
    within 10% of the target the one with width closest to 32 x depth wins (a sane aspect ratio).
    The count per layer is ~12 n_embd^2 plus embeddings.
    """
    cands = []
    for n_embd in range(64, 2049, 64):
        n_head = n_embd // 64 if n_embd >= 128 else n_embd // 32
        for n_layer in range(2, 9):
            cfg = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, 0.0, attention)
            err = abs(count_params(cfg) / target_params - 1)
            cands.append((err > 0.1, err if err > 0.1 else abs(n_embd / (64 * n_layer) - 1), cfg))
    return min(cands, key=lambda c: c[:2])[2]


def count_params(cfg):
    """Closed-form parameter count of GPT(cfg) (tied head, so the head adds nothing)."""
    e = cfg.n_embd
    per_block = (
        2 * (2 * e) + (3 * e * e + 3 * e) + (e * e + e) + (4 * e * e + 4 * e) + (4 * e * e + e)
    )
    return cfg.vocab_size * e + cfg.block_size * e + cfg.n_layer * per_block + 2 * e


# ---- a sequential view for pipeline parallelism ----


class EmbedLayer(nn.Module):
    """Token + position embeddings (and dropout) of a GPT: the first pipeline layer."""

    def __init__(self, gpt):
        super().__init__()
        self.tok_emb, self.pos_emb, self.drop = gpt.tok_emb, gpt.pos_emb, gpt.drop

    def forward(self, idx):
        pos = torch.arange(idx.size(1), device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))


class HeadLayer(nn.Module):
    """Final norm and the (tied) output projection of a GPT: the last pipeline layer."""

    def __init__(self, gpt):
        super().__init__()
        self.ln_f, self.head = gpt.ln_f, gpt.head

    def forward(self, x):
        return self.head(self.ln_f(x))


def pipeline_layers(gpt):
    """[embedding, block 0, ..., block n-1, norm + head], sharing gpt's parameters (the head's
    weight is the token embedding's): running them in order is gpt(idx)."""
    return [EmbedLayer(gpt), *gpt.blocks, HeadLayer(gpt)]


def lm_loss(logits, targets):
    """GPT.forward's loss on (B, S, V) logits."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
