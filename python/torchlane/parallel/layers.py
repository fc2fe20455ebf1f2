"""Tensor-parallel layers (Megatron-LM style) over a ProcessGroup of tp ranks.

Each layer is built from the unsharded module it replaces and keeps the slice of that module's
tensors that belongs to this rank, so a tensor-parallel model starts from exactly the weights of
the single-process model (see Note [Shard layout]).

Note [Shard layout]
A sharded parameter records (dim, parts) in its module's `tp_shards`: the full tensor is split
along `dim` into `parts` (sizes summing to the full size; one part when None), and each part into
tp equal contiguous chunks; rank r's shard is the concatenation of chunk r of every part. A fused
q/k/v projection (parts = (H*D, Hkv*D, Hkv*D)) thereby gives each rank the q, k and v of the same
heads; a plain layer is one part. full_state_dict / load_full_state_dict (tensor.py) use the same
rule in both directions.
"""

import torch
import torch.nn.functional as F
from torch import nn

from torchlane.parallel import comm


def check_divisible(where, name, size, n):
    if size % n != 0:
        raise ValueError(
            f"{where}: {name} ({size}) must be divisible by the tensor-parallel size ({n})"
        )


def shard_of(full, dim, parts, rank, n):
    """Rank `rank`'s shard of `full` (Note [Shard layout])."""
    sizes = [full.size(dim)] if parts is None else list(parts)
    pieces = [p.chunk(n, dim)[rank] for p in full.split(sizes, dim)]
    return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]


def unshard(local, dim, parts, group):
    """The full tensor from every rank's shard (a collective over `group`)."""
    n = group.size()
    full = comm.all_gather(local.detach().contiguous(), group, dim)
    if parts is None:
        return full
    local_sizes = [p // n for p in parts]
    per_rank = full.chunk(n, dim)
    by_part = [r.split(local_sizes, dim) for r in per_rank]
    return torch.cat([by_part[r][i] for i in range(len(parts)) for r in range(n)], dim)


class _TPModule(nn.Module):
    def _setup(self, group, shards):
        self.process_group = group
        self.tp_size = group.size()
        self.tp_rank = group.rank()
        self.tp_shards = shards  # {param name: (dim, parts)}; Note [Shard layout]

    def _take(self, full, name, dim, parts=None):
        t = shard_of(full.detach(), dim, parts, self.tp_rank, self.tp_size).clone()
        return nn.Parameter(t, requires_grad=full.requires_grad)


class ColumnParallelLinear(_TPModule):
    """y = x W^T + b with W's output features (rows) split across the group.

    The input is replicated (or, with sequence_parallel, this rank's chunk along seq_dim, gathered
    in the forward); the output is this rank's out_features / tp columns, or the full output when
    gather_output. parts: the fused sub-matrices of W along the output features (e.g. q, k, v),
    each split separately (Note [Shard layout]).
    """

    def __init__(
        self,
        linear,
        process_group,
        *,
        parts=None,
        gather_output=False,
        sequence_parallel=False,
        seq_dim=1,
    ):
        super().__init__()
        where = "ColumnParallelLinear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}: linear must be an nn.Linear, got {type(linear).__name__}")
        n = process_group.size()
        if parts is not None:
            parts = tuple(int(p) for p in parts)
            if sum(parts) != linear.out_features:
                raise ValueError(
                    f"{where}: parts {parts} must sum to out_features ({linear.out_features})"
                )
            for i, p in enumerate(parts):
                check_divisible(where, f"parts[{i}]", p, n)
        else:
            check_divisible(where, "out_features", linear.out_features, n)
        self._setup(process_group, {"weight": (0, parts)})
        self.in_features = linear.in_features
        self.out_features = linear.out_features // n
        self.parts = parts
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.seq_dim = seq_dim
        self.weight = self._take(linear.weight, "weight", 0, parts)
        if linear.bias is not None:
            self.bias = self._take(linear.bias, "bias", 0, parts)
            self.tp_shards["bias"] = (0, parts)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        y = comm.column_parallel_linear(
            x, self.weight, self.bias, self.process_group, self.sequence_parallel, self.seq_dim
        )
        if self.gather_output:
            y = comm.gather_from_region(y, self.process_group, -1)
        return y

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (per rank of "
            f"{self.tp_size}), bias={self.bias is not None}, sequence_parallel="
            f"{self.sequence_parallel}"
        )


class RowParallelLinear(_TPModule):
    """y = x W^T + b with W's input features (columns) split across the group.

    The input is this rank's in_features / tp slice (the output of a column-parallel layer), or
    the full input, split here, when not input_is_parallel. The partial products are summed with
    an all-reduce, or with sequence_parallel reduce-scattered along seq_dim; the bias is
    replicated and added after the sum.
    """

    def __init__(
        self, linear, process_group, *, input_is_parallel=True, sequence_parallel=False, seq_dim=1
    ):
        super().__init__()
        where = "RowParallelLinear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}: linear must be an nn.Linear, got {type(linear).__name__}")
        n = process_group.size()
        check_divisible(where, "in_features", linear.in_features, n)
        self._setup(process_group, {"weight": (1, None)})
        self.in_features = linear.in_features // n
        self.out_features = linear.out_features
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.seq_dim = seq_dim
        self.weight = self._take(linear.weight, "weight", 1)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        if not self.input_is_parallel:
            x = comm.scatter_to_region(x, self.process_group, -1)
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence_region(partial, self.process_group, self.seq_dim)
        else:
            y = comm.reduce_from_region(partial, self.process_group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self):
        return (
            f"in_features={self.in_features} (per rank of {self.tp_size}), out_features="
            f"{self.out_features}, bias={self.bias is not None}, sequence_parallel="
            f"{self.sequence_parallel}"
        )


class VocabParallelEmbedding(_TPModule):
    """An embedding whose rows (the vocabulary) are split across the group: each rank looks up
    the ids in its range, zeros the others, and the all-reduce (reduce-scatter along seq_dim with
    sequence_parallel) sums the one non-zero row per id."""

    def __init__(self, embedding, process_group, *, sequence_parallel=False, seq_dim=1):
        super().__init__()
        where = "VocabParallelEmbedding"
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"{where}: embedding must be an nn.Embedding, got {type(embedding).__name__}"
            )
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError(f"{where}: padding_idx and max_norm are not supported")
        n = process_group.size()
        check_divisible(
            where, "num_embeddings (the vocabulary size; pad it)", embedding.num_embeddings, n
        )
        self._setup(process_group, {"weight": (0, None)})
        self.num_embeddings = embedding.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.per_rank = self.num_embeddings // n
        self.vocab_start = self.tp_rank * self.per_rank
        self.sequence_parallel = sequence_parallel
        self.seq_dim = seq_dim
        self.weight = self._take(embedding.weight, "weight", 0)

    def forward(self, ids):
        # Every tp rank holds the same ids, so all of them raise together (no collective hangs).
        _check_ids("VocabParallelEmbedding: ids", ids, self.num_embeddings)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence_region(out, self.process_group, self.seq_dim)
        return comm.reduce_from_region(out, self.process_group)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, per rank {self.per_rank} rows"


def _check_ids(what, ids, n):
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise IndexError(
            f"{what} must be in [0, {n}), got values in [{int(ids.min())}, {int(ids.max())}]"
        )


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of vocab-sharded logits; only (tokens,)-sized statistics cross
    the wire: the max, then the sum of exponentials and the target's logit."""

    @staticmethod
    def forward(ctx, logits, targets, group):
        n, rank = group.size(), group.rank()
        per_rank = logits.size(-1)
        x = logits if logits.dtype == torch.float64 else logits.float()  # fp32 at least
        row_max = comm.all_reduce(x.max(dim=-1).values, group, "max")
        shifted = x - row_max.unsqueeze(-1)
        local = targets - rank * per_rank
        outside = (local < 0) | (local >= per_rank)
        local = local.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0)
        exp = shifted.exp()
        stats = torch.stack([exp.sum(-1), target_logit])
        stats = comm.all_reduce(stats, group, "sum") if n > 1 else stats
        sum_exp, target_logit = stats[0], stats[1]
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        ctx.logits_dtype = logits.dtype
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits, targets, process_group, reduction="mean"):
    """Cross-entropy of logits sharded along the vocabulary (last dim, rank r holding ids
    [r * V/tp, (r + 1) * V/tp)), without gathering the full logits. logits (..., V/tp),
    targets (...) of ids in [0, V). reduction: "mean", "sum" or "none"."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"vocab_parallel_cross_entropy: targets shape {tuple(targets.shape)} must equal "
            f"logits shape without its last dim {tuple(logits.shape[:-1])}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"vocab_parallel_cross_entropy: reduction must be 'mean', 'sum' or 'none', got "
            f"{reduction!r}"
        )
    _check_ids(
        "vocab_parallel_cross_entropy: targets", targets, logits.size(-1) * process_group.size()
    )
    loss = _VocabParallelCrossEntropy.apply(logits, targets, process_group)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
