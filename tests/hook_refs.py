"""Float64 reference implementations of torchlane's compression hooks, written from the papers
and torch's documented hook semantics, independent of torchlane's C++ code.

Every reference simulates all ranks at once: it gets every rank's gradient and returns what each
rank should hold afterwards.
"""

import math

import numpy as np
import torch


def gram_schmidt(a, eps=0.0):
    """Modified Gram-Schmidt on the columns of `a` (float64 copy)."""
    a = a.double().clone()
    for i in range(a.shape[1]):
        a[:, i] /= a[:, i].norm() + eps
        if i + 1 < a.shape[1]:
            col = a[:, i : i + 1]
            rest = a[:, i + 1 :]
            rest -= (col * rest).sum(0, keepdim=True) * col
    return a


def powersgd_plan(shapes, rank, min_compression_rate):
    """torch's rule: view as (shape[0], -1); compress when (n + m) r rate < n m; 1-D never.

    Returns ([(tensor, n, m, r)] grouped by (n, m) in order of first appearance, [uncompressed]).
    """
    groups, uncompressed = {}, []
    for t, shape in enumerate(shapes):
        if len(shape) < 2:
            uncompressed.append(t)
            continue
        n, m = shape[0], math.prod(shape[1:])
        r = min(n, m, rank)
        if (n + m) * r * min_compression_rate < n * m:
            groups.setdefault((n, m), []).append(t)
        else:
            uncompressed.append(t)
    compressed = [(t, n, m, min(n, m, rank)) for (n, m), ts in groups.items() for t in ts]
    return compressed, uncompressed


class PowerSGDReference:
    """PowerSGD (Vogels et al. 2019, Algorithm 1 with error feedback and warm start), with the
    step counter, random initialisation and bookkeeping of torch's powerSGD_hook, in float64."""

    def __init__(self, world, rank, start_iter, min_rate, error_feedback, warm_start, eps, seed):
        self.world, self.rank, self.start_iter = world, rank, start_iter
        self.min_rate, self.ef, self.warm, self.eps = min_rate, error_feedback, warm_start, eps
        self.rng = np.random.RandomState(seed)
        self.iter = 0
        self.p, self.q, self.err = {}, {}, {}  # per bucket; err is a list over ranks

    def step(self, index, is_last, shapes, grads):
        """grads[r]: flat float64 bucket of rank r. Returns the averaged bucket (all ranks)."""
        world = self.world
        if self.iter < self.start_iter:
            if is_last:
                self.iter += 1
            return sum(grads) / world
        n_total = grads[0].numel()
        if self.ef:
            errs = self.err.get(index, [torch.zeros(n_total, dtype=torch.float64)] * world)
            local = [g + e for g, e in zip(grads, errs, strict=True)]
        else:
            local = [g.clone() for g in grads]
        offsets = np.cumsum([0] + [math.prod(s) for s in shapes])

        def piece(flat, t):
            return flat[offsets[t] : offsets[t + 1]]

        compressed, uncompressed = powersgd_plan(shapes, self.rank, self.min_rate)
        result = torch.empty(n_total, dtype=torch.float64)
        for t in uncompressed:
            piece(result, t).copy_(sum(piece(x, t) for x in local) / world)

        if not self.warm or index not in self.q:
            g = torch.Generator().manual_seed(int(self.rng.randint(1_000_000_000)))
            qs = [
                torch.randn((1, m, r), generator=g, dtype=torch.float32).reshape(m, r).double()
                for (_, n, m, r) in compressed
            ]
        else:
            qs = self.q[index]
        qs = [gram_schmidt(q, self.eps) for q in qs]
        ps, new_qs = [], []
        for (t, n, m, _), q in zip(compressed, qs, strict=True):
            mats = [piece(x, t).view(n, m) for x in local]
            p = gram_schmidt(sum(mat @ q for mat in mats), self.eps)
            q_new = sum(mat.T @ p for mat in mats) / world
            piece(result, t).copy_((p @ q_new.T).reshape(-1))
            ps.append(p)
            new_qs.append(q_new)
        self.p[index], self.q[index] = ps, new_qs
        if self.ef:
            self.err[index] = [x - result for x in local]
        if is_last:
            self.iter += 1
        return result

    def flat_pq(self, index):
        """P and Q memories laid out as the hook lays them out (plan order, row-major)."""
        return (
            torch.cat([p.reshape(-1) for p in self.p[index]]),
            torch.cat([q.reshape(-1) for q in self.q[index]]),
        )


def topk_plan(shapes, ratio, min_compression_rate, element_size):
    """Which tensors top-k compresses: >= 2 dimensions, and its ceil(ratio * numel) (value, int32
    index) pairs times min_compression_rate take fewer bytes than the tensor. ([compressed],
    [dense])."""
    compressed, dense = [], []
    for t, shape in enumerate(shapes):
        numel = math.prod(shape)
        k = min(max(math.ceil(ratio * numel), 1), max(numel, 1))
        sent = k * (element_size + 4)
        if len(shape) >= 2 and sent * min_compression_rate < numel * element_size:
            compressed.append(t)
        else:
            dense.append(t)
    return compressed, dense


def topk_ratio_at(ratio, warmup_iters, step):
    """Deep Gradient Compression's exponentially decreasing density, one exponent per step."""
    return ratio ** ((step + 1) / (warmup_iters + 1)) if step < warmup_iters else ratio


class TopKReference:
    """Top-k with error feedback (Stich et al. 2018) and Deep Gradient Compression's recipe
    (Lin et al. 2018: dense warm-up steps, exponentially decreasing density, small tensors
    uncompressed, optionally one top-k per tensor), for all ranks, in float64. A step whose
    (value, int32 index) pairs would take at least the compressed tensors' bytes sends
    everything dense instead."""

    def __init__(
        self, world, ratio, start_iter, ratio_warmup_iters, min_compression_rate, layerwise
    ):
        self.world, self.ratio, self.start_iter = world, ratio, start_iter
        self.warmup, self.layerwise = ratio_warmup_iters, layerwise
        self.min_rate = min_compression_rate
        self.iter = 0
        self.residuals = {}  # bucket -> (shapes, [residual over the compressed tensors per rank])

    def step(self, index, is_last, shapes, grads, element_size=4):
        """grads[r]: flat bucket of rank r. Returns (averaged bucket, elements sent per rank:
        (values, dense)) - (0, numel) on an uncompressed step."""
        world = self.world
        grads = [g.double() for g in grads]
        numel = grads[0].numel()
        step = self.iter
        if is_last:
            self.iter += 1
        if step < self.start_iter:
            return sum(grads) / world, (0, numel)
        ratio = topk_ratio_at(self.ratio, self.warmup, step - self.start_iter)
        offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
        compressed, dense = topk_plan(shapes, self.ratio, self.min_rate, element_size)

        def piece(flat, t):
            return flat[offsets[t] : offsets[t + 1]]

        result = torch.zeros(numel, dtype=torch.float64)
        for t in dense:
            piece(result, t).copy_(sum(piece(g, t) for g in grads) / world)
        cn = sum(math.prod(shapes[t]) for t in compressed)
        saved = self.residuals.get(index)
        if saved is None or saved[0] != shapes:
            saved = (shapes, [torch.zeros(cn, dtype=torch.float64)] * world)
        accs = [
            torch.cat([piece(grads[r], t) for t in compressed] + [result[:0]]) + saved[1][r]
            for r in range(world)
        ]
        sizes = [math.prod(shapes[t]) for t in compressed] if self.layerwise else [cn]
        entries = sum(min(max(math.ceil(ratio * n), 1), n) for n in sizes if n > 0)
        if cn > 0 and entries * (element_size + 4) >= cn * element_size:
            # Top-k would not save bytes: every rank sends everything, dense (an all-reduce).
            start = 0
            for t in compressed:
                n = math.prod(shapes[t])
                piece(result, t).copy_(sum(acc[start : start + n] for acc in accs) / world)
                start += n
            self.residuals[index] = (shapes, [torch.zeros(cn, dtype=torch.float64)] * world)
            return result, (0, numel)
        new_residuals, sent = [], 0
        for r in range(world):
            acc = accs[r]
            if self.layerwise:
                chosen, start = [], 0
                for t in compressed:
                    n = math.prod(shapes[t])
                    k = min(max(math.ceil(ratio * n), 1), n)
                    chosen.append(acc[start : start + n].abs().topk(k).indices + start)
                    start += n
                idx = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
            else:
                k = min(max(math.ceil(ratio * cn), 1), cn)
                idx = acc.abs().topk(k).indices
            sent = idx.numel()
            update = torch.zeros(cn, dtype=torch.float64)
            update[idx] = acc[idx] / world
            start = 0
            for t in compressed:
                n = math.prod(shapes[t])
                piece(result, t).add_(update[start : start + n])
                start += n
            rest = acc.clone()
            rest[idx] = 0
            new_residuals.append(rest)
        if cn > 0:
            self.residuals[index] = (shapes, new_residuals)
        dense_numel = sum(math.prod(shapes[t]) for t in dense)
        return result, (sent, dense_numel)

    def residual(self, index, rank):
        return self.residuals[index][1][rank]
