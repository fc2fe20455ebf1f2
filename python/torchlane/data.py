"""Token-balanced distributed sampling, packing, global-token loss and straggler-aware shares.

    sampler = torchlane.data.TokenBalancedSampler(lengths, batch_size=32, seed=0)
    for epoch in range(E):
        sampler.set_epoch(epoch)
        for indices in sampler:                     # this rank's examples for one global step
            tokens = sum(lengths[i] for i in indices)
            n = torchlane.data.global_token_count(tokens)
            loss = per_token_loss_sum / n * world_size   # DDP averages: grad = full batch's

With a plain ``DistributedSampler`` over variable-length documents, the rank that draws the long
ones sets every step's pace and the others pad. Here every global step takes ``batch_size``
examples (a fixed, seeded permutation of the epoch, cut into consecutive steps exactly as a
single process would) and splits them over the ranks so that each rank's token count is as close
as possible to its share (greedy longest-first: each example, longest first, goes to the rank
whose load relative to its share is smallest). The plan is a pure function of (lengths, seed,
epoch, batch_size, world size, shares), so every rank computes the same one without
communication, and every example of the epoch appears exactly once on exactly one rank.

Exactness (Note [Global token normalisation]): the per-token loss of the global step is
``sum over all ranks' tokens / N`` with N the global token count. Each rank computes its local
sum divided by N (an all-reduce of one integer, :func:`global_token_count`) and multiplies by the
world size because DDP averages gradients; the averaged gradient is then that of the global
batch's per-token mean, however the examples were split. This is what makes both token balancing
and uneven straggler shares (:class:`StragglerBalancer`) change the speed and not the math.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "TokenBalancedSampler",
    "balance_step",
    "pack_documents",
    "cu_seqlens_for_row",
    "global_token_count",
    "token_normalized_loss",
    "StragglerBalancer",
]


def _check_lengths(lengths) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    try:
        out = [int(x) for x in lengths]
    except (TypeError, ValueError) as e:
        raise TypeError(f"lengths must be a sequence of ints, got {type(lengths).__name__}") from e
    for i, n in enumerate(out):
        if n < 1:
            raise ValueError(f"lengths[{i}] must be >= 1, got {n}")
    if not out:
        raise ValueError("lengths must not be empty")
    return out


def _check_shares(shares, world_size: int) -> list[float]:
    if shares is None:
        return [1.0] * world_size
    shares = [float(s) for s in shares]
    if len(shares) != world_size:
        raise ValueError(f"shares must have one entry per rank ({world_size}), got {len(shares)}")
    if any(not math.isfinite(s) or s <= 0 for s in shares):
        raise ValueError(f"shares must be finite and > 0, got {shares}")
    return shares


def balance_step(
    indices: Sequence[int], lengths: Sequence[int], world_size: int, shares=None
) -> list[list[int]]:
    """Split one global step's ``indices`` over ``world_size`` ranks by tokens.

    Greedy longest-first (LPT): examples sorted by length (ties by position, so the result is
    deterministic), each given to the rank with the smallest ``load / share`` (ties: lowest rank).
    With equal shares the largest rank load is at most 4/3 of the optimum (Graham's bound) and at
    most the mean load plus the longest example. Each rank's list keeps the step's order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    shares = _check_shares(shares, world_size)
    order = sorted(range(len(indices)), key=lambda p: (-lengths[indices[p]], p))
    loads = [0] * world_size
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for p in order:
        r = min(range(world_size), key=lambda r: ((loads[r] + lengths[indices[p]]) / shares[r], r))
        loads[r] += lengths[indices[p]]
        assigned[r].append(p)
    return [[indices[p] for p in sorted(ps)] for ps in assigned]


def pack_documents(
    indices: Sequence[int], lengths: Sequence[int], row_len: int
) -> list[list[tuple[int, int, int]]]:
    """Pack documents into rows of ``row_len`` tokens (first-fit decreasing).

    Returns rows; each row is a list of segments ``(example_index, start, length)`` meaning
    tokens ``[start, start + length)`` of that example. A document longer than ``row_len`` is cut
    into ``row_len`` chunks (each chunk its own segment, attention does not cross segments).
    Every token of every document appears in exactly one segment.
    """
    if not isinstance(row_len, int) or row_len < 1:
        raise ValueError(f"row_len must be an int >= 1, got {row_len!r}")
    pieces = []
    for i in indices:
        for start in range(0, lengths[i], row_len):
            pieces.append((i, start, min(row_len, lengths[i] - start)))
    pieces.sort(key=lambda s: -s[2])  # stable: ties keep document order
    rows: list[list[tuple[int, int, int]]] = []
    free: list[int] = []
    for seg in pieces:
        for r, f in enumerate(free):
            if f >= seg[2]:
                rows[r].append(seg)
                free[r] -= seg[2]
                break
        else:
            rows.append([seg])
            free.append(row_len - seg[2])
    return rows


def cu_seqlens_for_row(row: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Cumulative segment offsets ``[0, l0, l0+l1, ...]`` (int64) of a packed row, for
    :func:`torchlane.attention.varlen_attention`."""
    out = [0]
    for _, _, n in row:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int64)


class TokenBalancedSampler:
    """A batch sampler: each iteration yields this rank's example indices for one global step.

    Args:
        lengths: tokens per example (ints >= 1).
        batch_size: examples per global step (all ranks together).
        num_replicas, rank: default from the initialised process group.
        seed: the permutation's seed; with ``set_epoch`` the plan depends on (seed, epoch) only.
        shuffle: permute the examples each epoch (otherwise dataset order).
        drop_last: drop a final step with fewer than ``batch_size`` examples. Without it the
            last step is smaller; a step that has fewer examples than ranks gives some ranks an
            empty list (they must still run forward/backward with zero loss so DDP's collectives
            match; see docs/data.md).
        pack_len: if set, a step's examples are first packed into rows of ``pack_len`` tokens
            (:func:`pack_documents`) and the rows are balanced over ranks by their used tokens;
            each iteration then yields a list of rows (lists of ``(index, start, length)``).
        shares: relative throughput per rank (default equal); :class:`StragglerBalancer`
            updates it through :meth:`set_shares`.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pack_len: int | None = None,
        shares=None,
    ):
        self.lengths = _check_lengths(lengths)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if num_replicas is None or rank is None:
            if not torch.distributed.is_available() or not torch.distributed.is_initialized():
                raise ValueError(
                    "num_replicas and rank are required when no process group is initialised"
                )
            num_replicas = (
                torch.distributed.get_world_size() if num_replicas is None else num_replicas
            )
            rank = torch.distributed.get_rank() if rank is None else rank
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
        if pack_len is not None and (not isinstance(pack_len, int) or pack_len < 1):
            raise ValueError(f"pack_len must be an int >= 1 or None, got {pack_len!r}")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.pack_len = pack_len
        self.shares = _check_shares(shares, num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_shares(self, shares) -> None:
        """Relative throughput per rank for the steps planned from now on."""
        self.shares = _check_shares(shares, self.num_replicas)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def global_steps(self) -> list[list[int]]:
        """The epoch's global steps (lists of indices), identical on every rank."""
        n = len(self.lengths)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(n, generator=g).tolist()
        else:
            perm = list(range(n))
        return [perm[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]

    def plan_step(self, step_indices: Sequence[int]) -> list[list]:
        """Every rank's share of one global step (examples, or packed rows with ``pack_len``)."""
        if self.pack_len is None:
            return balance_step(step_indices, self.lengths, self.num_replicas, self.shares)
        rows = pack_documents(step_indices, self.lengths, self.pack_len)
        used = [sum(s[2] for s in row) for row in rows]
        split = balance_step(list(range(len(rows))), used, self.num_replicas, self.shares)
        return [[rows[i] for i in ids] for ids in split]

    def plan(self) -> list[list[list]]:
        """``plan()[step][rank]``: the whole epoch, as every rank computes it."""
        return [self.plan_step(s) for s in self.global_steps()]

    def __iter__(self):
        # Planned one step at a time so that set_shares() between steps takes effect.
        for step in self.global_steps():
            yield self.plan_step(step)[self.rank]

    def imbalance(self) -> dict:
        """Token imbalance of this epoch's plan: max rank tokens / mean rank tokens per step
        (worst and mean over steps), and the padding a rectangular batch would need."""
        worst, total, pad, real = 1.0, 0.0, 0, 0
        plan = self.plan()
        for step in plan:
            toks = [self._tokens(part) for part in step]
            mean = sum(toks) / len(toks)
            ratio = max(toks) / mean if mean > 0 else 1.0
            worst, total = max(worst, ratio), total + ratio
            for part in step:
                if self.pack_len is None and part:
                    lens = [self.lengths[i] for i in part]
                    pad += max(lens) * len(lens) - sum(lens)
                elif self.pack_len is not None:
                    pad += self.pack_len * len(part) - self._tokens(part)
            real += sum(toks)
        return {
            "max_over_mean_worst": worst,
            "max_over_mean_mean": total / max(len(plan), 1),
            "padding_fraction": pad / max(pad + real, 1),
        }

    def _tokens(self, part) -> int:
        if self.pack_len is None:
            return sum(self.lengths[i] for i in part)
        return sum(s[2] for row in part for s in row)


def global_token_count(local_tokens, group=None) -> int:
    """Sum of ``local_tokens`` over the ranks of ``group`` (one int64 all-reduce); the local
    count when no process group is initialised."""
    if isinstance(local_tokens, torch.Tensor):
        local_tokens = int(local_tokens.item())
    if isinstance(local_tokens, bool) or not isinstance(local_tokens, int) or local_tokens < 0:
        raise ValueError(f"local_tokens must be an int >= 0, got {local_tokens!r}")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return local_tokens
    t = torch.tensor([local_tokens], dtype=torch.int64)
    torch.distributed.all_reduce(t, group=group)
    return int(t.item())


def token_normalized_loss(loss_sum: torch.Tensor, global_tokens: int, world_size: int):
    """``loss_sum * world_size / global_tokens``: this rank's summed per-token loss scaled so
    that DDP's gradient average equals the gradient of the global per-token mean loss.

    Note [Global token normalisation]: DDP computes ``(1/W) sum_r grad(L_r)``. With
    ``L_r = W * S_r / N`` (S_r this rank's summed loss, N the global token count) that is
    ``grad(sum_r S_r) / N``, the full batch's per-token mean gradient, for any split of the
    examples over ranks (even, token-balanced, or straggler-weighted)."""
    if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 1:
        raise ValueError(f"global_tokens must be an int >= 1, got {global_tokens!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return loss_sum * (world_size / global_tokens)


class StragglerBalancer:
    """Straggler-aware shares: measure each rank's step time, shift tokens away from a rank
    that stays slower.

        bal = StragglerBalancer(sampler, patience=3, threshold=1.2)
        for indices in sampler:
            t0 = time.perf_counter(); local_forward_backward(indices)  # no collective inside
            bal.step(time.perf_counter() - t0, tokens=sum(lengths[i] for i in indices))

    ``step_time`` must be this rank's own work (forward + backward compute), measured before
    any collective: a time that includes waiting for a slower peer at an all-reduce makes every
    rank look as slow as the slowest, and the shares overshoot.

    ``step`` all-gathers (time, tokens) (one tiny collective), keeps exponential moving
    averages of each rank's step time and tokens, and when the slowest rank's time has exceeded
    the fastest's by ``threshold`` for ``patience`` consecutive steps, sets the target shares in
    proportion to each rank's measured speed (tokens / time, normalised to mean 1), moves the
    shares halfway there and starts counting again. Speed, not time, because a step's tokens vary
    with the documents it drew: a rank that was slow because it drew more tokens is not a
    straggler.
    Every change is logged (``changes`` and the optional ``log`` callable). All ranks compute the
    same shares from the same gathered numbers, so their plans stay identical. The math stays
    exact through Note [Global token normalisation].
    """

    def __init__(
        self,
        sampler: TokenBalancedSampler,
        patience: int = 3,
        threshold: float = 1.2,
        ema: float = 0.5,
        group=None,
        log=None,
    ):
        if not isinstance(sampler, TokenBalancedSampler):
            raise TypeError(f"sampler must be a TokenBalancedSampler, got {type(sampler).__name__}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if not threshold > 1.0:
            raise ValueError(f"threshold must be > 1.0, got {threshold!r}")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema!r}")
        self.sampler, self.patience, self.threshold, self.ema = sampler, patience, threshold, ema
        self.group, self.log = group, log
        self.time_ema: list[float] | None = None
        self.tokens_ema: list[float] | None = None
        self.slow_steps = 0
        self.steps = 0
        self.changes: list[dict] = []

    def step(self, step_time: float, tokens: int) -> list[float]:
        if not step_time > 0:
            raise ValueError(f"step_time must be > 0 seconds, got {step_time!r}")
        w = self.sampler.num_replicas
        t = torch.tensor([float(step_time), float(tokens)], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [torch.empty_like(t) for _ in range(w)]
            torch.distributed.all_gather(parts, t, group=self.group)
        else:
            parts = [t] * w
        return self.observe([float(p[0]) for p in parts], [float(p[1]) for p in parts])

    def observe(self, times: Sequence[float], tokens: Sequence[float]) -> list[float]:
        """The pure part of :meth:`step`: update from every rank's (time, tokens)."""
        self.steps += 1
        times = [max(float(t), 1e-9) for t in times]
        tokens = [max(float(n), 1.0) for n in tokens]

        def update(avg, new):
            if avg is None:
                return list(new)
            return [self.ema * x + (1 - self.ema) * o for x, o in zip(new, avg, strict=True)]

        self.time_ema = update(self.time_ema, times)
        self.tokens_ema = update(self.tokens_ema, tokens)
        self.slow_steps = self.slow_steps + 1 if max(times) > self.threshold * min(times) else 0
        if self.slow_steps >= self.patience:
            # Shares in proportion to measured speed (tokens per second; the fixed point is equal
            # times: a rank's tokens follow its share), normalised to mean 1, then moved only
            # halfway: one noisy step must not swing the split, and a persistent slowdown
            # converges geometrically.
            old = self.sampler.shares
            target = [n / t for n, t in zip(self.tokens_ema, self.time_ema, strict=True)]
            norm = sum(target) / len(target)
            shares = [0.5 * o + 0.5 * t / norm for o, t in zip(old, target, strict=True)]
            change = {
                "step": self.steps,
                "old_shares": list(old),
                "new_shares": shares,
                "times": list(times),
                "tokens": list(tokens),
                "slowest_rank": max(range(len(times)), key=lambda r: times[r]),
            }
            self.sampler.set_shares(shares)
            self.changes.append(change)
            if self.log is not None:
                self.log(change)
            self.slow_steps = 0
            self.time_ema = self.tokens_ema = None  # measured under the old shares
        return list(self.sampler.shares)
