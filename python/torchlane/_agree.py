"""Settings that must be equal on every rank, checked once, with an error naming the argument.

Note [Options that must agree across ranks]
A rank's local choice must never change the size or the number of the collectives it issues: the
peers then wait on a message that never comes (a hang) or receive one of the wrong size (Gloo
aborts the process with SIGABRT). Whatever shapes the collectives (DDP's bucket_cap_mb,
find_unused_parameters, static_graph, check_finite, broadcast_buffers; a compression hook's
options such as PowerSGD's rank or top-k's ratio) is therefore compared across ranks where it is
set, at construction or registration, and a difference raises the same error on every rank, naming
the argument and each rank's value. The values cross the wire as their repr() encoded in a uint8
tensor (no pickles).
"""

import torch
import torch.distributed as dist


def _gather_bytes(data: bytes, group, world):
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor(list(data), dtype=torch.uint8, device=device)
    size = torch.tensor([mine.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: mine.numel()] = mine
    rows = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(rows, padded, group=group)
    return [bytes(r[: int(s)].cpu().tolist()) for r, s in zip(rows, sizes, strict=True)]


def check_same_on_all_ranks(where: str, options: dict, group=None):
    """Raise ValueError on every rank if any of `options` (name -> value) differs between ranks."""
    if not dist.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    names = list(options)
    text = "\x00".join(f"{k}={options[k]!r}" for k in names).encode()
    rows = [row.decode().split("\x00") for row in _gather_bytes(text, group, world)]
    for i, name in enumerate(names):
        values = [
            row[i].split("=", 1)[1] if i < len(row) and "=" in row[i] else "?" for row in rows
        ]
        if len(set(values)) > 1:
            by_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(
                f"{where}: {name} must be the same on every rank (it decides the size of the "
                f"collectives), got {by_rank}"
            )
