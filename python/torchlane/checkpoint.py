"""Crash-safe checkpoints for data-parallel training.

    from torchlane import checkpoint

    info = checkpoint.load("ckpt/", model, optimizer, scheduler=scheduler, missing_ok=True)
    # info is None on a fresh start (no checkpoint yet)
    start = info.step + 1 if info else 0
    for step in range(start, num_steps):
        ...
        if step % 100 == 0:
            checkpoint.save("ckpt/", model, optimizer, step, data_position=i, scheduler=scheduler)

Every rank calls `save` and `load` (they are collectives when a process group is initialised).

Note [Checkpoint file]
A checkpoint is one ordinary `torch.save` file, `<dir>/ckpt-<step>.pt`, readable with
`torch.load(f, weights_only=True)`. Its "model" entry is the state_dict of the *unwrapped*
model (no `module.` prefix) as a plain dict, so it loads into a bare model; "model_metadata"
holds the state_dict's module versions (its `_metadata`), which `load` attaches again. Plain
dicts only, so that the C++ API reads and writes the same files (Note [C++ checkpoints] in
csrc/api/checkpoint.h). Rank 0 writes it to a temporary file
in the same directory, fsyncs it, renames it into place and fsyncs the directory: the newest
`ckpt-*.pt` is always complete, whatever moment the job dies at. Only the last `keep_last`
checkpoints are kept (see Note [Checkpoint retention]). The file carries a SHA-256 digest of its own content ("checksum"), which
`load` recomputes: a truncated or bit-flipped file is detected instead of loaded.

Note [Checkpoint retention]
`load` resumes from the highest step number, so "newest" means highest step. A `save` of step s
into a directory that already holds checkpoints of higher steps (a rollback, a run restarted from
step 0 into an old directory) would either be deleted again by keep-last-K or be shadowed by the
abandoned run's files at the next `load`. Neither is acceptable, so such a save refuses with a
CheckpointError naming the higher steps and writes nothing, unless the caller passes
`discard_newer=True`: then the new file is written and made durable first, and only then are the
higher-step files removed, so the file just written is the newest and is never removed. Keep-last-K
then removes the oldest steps among the rest; the file just written is never one of them.

Note [Checkpoint errors]
`save` writes nothing partial: the state is serialised in memory first, so a full disk shows as an
OSError of the plain file write, raised as a CheckpointError naming the path and the errno (for
example ENOSPC); the temporary file is removed and older checkpoints are untouched. `load`
validates everything it will apply (model keys and shapes under strict=True, presence of the
optimizer state and of every stateful keyword) before it changes anything, and a directory that
does not exist is an error unless the caller passes `missing_ok=True` (a fresh start).

Note [Checkpoint RNG state]
Each rank has its own random streams (dropout, data augmentation), so `save` gathers every
rank's torch (and CUDA), numpy and Python RNG states to rank 0, packed into one uint8 tensor
per rank (tensors on the wire, never pickles), and `load` gives each rank its own back. That
and the optimizer state are what make "train 20 steps" and "train 10, save, restart, load,
train 10" bitwise identical on the CPU. RNG streams the library cannot see (a DataLoader's own
torch.Generator, for instance) belong in `**extra`.

Note [Checkpoint agreement]
`save` first checks that all ranks hold the same parameters (a digest compared across ranks):
replicas that diverged are an error, not something to checkpoint silently. (Buffers such as
BatchNorm statistics may differ after a forward; rank 0's are saved.) `load` lets rank 0
choose the file, every rank reads it, and the ranks compare the digests of what they read; all
ranks load the same bytes or all of them raise.
"""

import dataclasses
import errno
import hashlib
import io
import os
import random
import re
import tempfile
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from torchlane import _sharded_checkpoint as _sharded
from torchlane._validate import check_int

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a dependency, but its RNG is optional
    np = None

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "save",
    "load",
    "read",
    "list_checkpoints",
    "consolidate",
]

FORMAT = "torchlane.checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read or verified."""


@dataclasses.dataclass
class Checkpoint:
    """What `load` restored besides the model, optimizer and stateful extras."""

    path: str
    step: int
    data_position: Any
    extra: dict


def checkpoint_path(directory, step):
    return os.path.join(os.fspath(directory), f"ckpt-{step:010d}.pt")


def list_checkpoints(directory):
    """(step, path) of every checkpoint in `directory`, oldest first ([] if it does not exist)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# save


def save(
    path,
    model,
    optimizer,
    step,
    *,
    data_position=None,
    keep_last=3,
    process_group=None,
    verify_replicas=True,
    discard_newer=False,
    **extra,
):
    """Write a checkpoint of `model`, `optimizer`, `step` and every rank's RNG state.

    path: checkpoint directory (created if needed); the file is `<path>/ckpt-<step>.pt`.
    model: the module, bare or wrapped in (torchlane or torch) DistributedDataParallel.
    optimizer: a torch.optim.Optimizer or None.
    data_position: anything describing where the data stream is (epoch, batch index, ...).
    keep_last: keep only this many newest checkpoints in `path` (None keeps all). The file just
        written is never removed. See Note [Checkpoint retention].
    discard_newer: if `path` holds checkpoints of steps higher than `step`, save refuses with a
        CheckpointError naming them (nothing is written); with True it writes the new checkpoint
        and then removes those higher-step files, so that `load` resumes from this one.
    extra: more state to save under its keyword: objects with a `state_dict()` method (an LR
        scheduler, a GradScaler) are saved through it and restored by passing the same keyword
        to `load`; anything else (tensors, numbers, strings, lists, dicts of those) is saved
        as-is and returned in `Checkpoint.extra`.
    Returns the path of the written file on every rank. A failed write (a full disk: ENOSPC)
    raises CheckpointError naming the file and the errno; older checkpoints stay intact.
    """
    _check_step(step)
    if not isinstance(discard_newer, bool):
        raise TypeError(f"checkpoint.save: discard_newer must be True or False, got {discard_newer!r}")
    check_int("keep_last", keep_last, 1, allow_none=True, where="checkpoint.save")
    module = _unwrap(model, "checkpoint.save")
    if _sharded.is_sharded_model(module):  # Note [Sharded checkpoint files]
        return _sharded.save(
            path,
            module,
            optimizer,
            step,
            data_position=data_position,
            keep_last=keep_last,
            discard_newer=discard_newer,
            extra=extra,
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"checkpoint.save: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    pg, rank, world = _group(process_group)

    model_state = _cpu(module.state_dict())
    if verify_replicas and world > 1:
        _check_replicas_agree(module, pg, rank, world)
    rngs = _gather_rng_states(pg, rank, world)  # collective: before any rank-0-only work
    target = checkpoint_path(path, step)

    error = None
    if rank == 0:
        try:
            newer = [(s, p) for s, p in list_checkpoints(path) if s > step]
            if newer and not discard_newer:
                raise CheckpointError(
                    f"checkpoint.save: {os.fspath(path)} holds checkpoints of higher steps "
                    f"{[s for s, _ in newer]} than step {step}; `load` would resume from those. "
                    "Pass discard_newer=True to replace them by this one, or save elsewhere. "
                    "Nothing was written"
                )
            state = {
                "format": FORMAT,
                "step": int(step),
                "world_size": world,
                "torch_version": str(torch.__version__),
                # A plain dict and its module versions beside it: torch's C++ unpickler cannot
                # read an OrderedDict (Note [C++ checkpoints] in csrc/api/checkpoint.h).
                "model": dict(model_state),
                "model_metadata": _metadata_of(model_state),
                "optimizer": _cpu(optimizer.state_dict()) if optimizer is not None else None,
                "data_position": data_position,
                "extra": {k: _extra_state(k, v) for k, v in extra.items()},
                "rng": rngs,
            }
            # Also rejects values that torch.load(weights_only=True) would refuse to load back.
            state["checksum"] = _digest(state, where="checkpoint")
            _write_atomically(os.fspath(path), target, state)
            for _, old in newer:  # discard_newer=True: only once the new file is durable
                _remove_checkpoint(old)
            if keep_last is not None:
                for _, old in list_checkpoints(path)[:-keep_last]:
                    if old != target:  # never the file just written
                        _remove_checkpoint(old)
        except BaseException as e:  # noqa: B036 - the other ranks must learn about any failure
            error = e
    if world > 1:
        flag = torch.tensor([1 if error is not None else 0], dtype=torch.int64)
        dist.broadcast(flag, src=_global_rank(pg, 0), group=pg)
        if rank != 0 and flag.item():
            raise CheckpointError(
                f"rank 0 failed to write checkpoint {target} (see rank 0's error)"
            )
    if error is not None:
        raise error
    return target


def _remove_checkpoint(path):
    """Removes a checkpoint file and, for a sharded one, its shard files (manifest first)."""
    os.remove(path)
    for shard in _sharded.shard_files(path):
        os.remove(shard)


def _write_atomically(directory, target, state, prefix=".ckpt-"):
    # Serialise in memory first: torch.save's C++ writer reports a failed write (a full disk) as
    # an unreadable RuntimeError, a plain file write as an OSError with its errno.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        _write_file(directory, target, buffer.getbuffer(), prefix)
    except OSError as e:
        code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "unknown errno"
        raise CheckpointError(
            f"checkpoint.save: writing {target} failed with {code} ({e.strerror or e}); "
            "nothing was written and older checkpoints are intact"
        ) from e


def _write_file(directory, target, data, prefix=".ckpt-"):
    # `prefix` is per writer: the ranks of a sharded save write into one directory at once.
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):  # leftovers of a writer that died mid-write
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _extra_state(name, value):
    state_dict = getattr(value, "state_dict", None)
    return state_dict() if callable(state_dict) else value


# ---------------------------------------------------------------------------------------------
# load


def read(path):
    """Read and verify one checkpoint file; returns its dict. Raises CheckpointError if corrupt."""
    return read_any(path, FORMAT)


def consolidate(path):
    """The full, unsharded model state_dict of a checkpoint file (or of the newest checkpoint in
    a directory), loadable by the plain nn.Module; for a sharded checkpoint it is assembled from
    every rank's shard file (Note [Sharded checkpoint files]). Needs no process group."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"checkpoint.consolidate: no checkpoint in {path}")
        path = found[-1][1]
    return _sharded.consolidate(path)


def read_any(path, fmt):
    """read() for a file of format `fmt` (a checkpoint or one of its shard files)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint file {path} cannot be loaded (corrupt, truncated or not a weights-only "
            "checkpoint): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise CheckpointError(f"checkpoint file {path} is not a torchlane checkpoint ({fmt})")
    expected = state.pop("checksum", None)
    actual = _digest(state)
    if expected != actual:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: its content checksum is {actual}, "
            f"the checksum stored in it is {expected}"
        )
    state["checksum"] = actual
    return state


def load(
    path,
    model,
    optimizer=None,
    *,
    fallback=False,
    strict=True,
    restore_rng=True,
    process_group=None,
    missing_ok=False,
    **stateful,
):
    """Load the newest checkpoint in directory `path` (or the file `path`) on every rank.

    Restores the model (bare or DDP-wrapped), the optimizer, this rank's RNG states and every
    keyword object in `stateful` (by `load_state_dict`, matching the keyword given to `save`).
    fallback: if the newest checkpoint is corrupt or truncated, warn and try the previous one
        instead of raising.
    missing_ok: with True, a directory `path` that does not exist is a fresh start (returns None);
        with False (default) it raises FileNotFoundError, so a typo is not a silent fresh start.
    Everything is validated before anything is applied: a checkpoint that lacks a stateful key,
    the optimizer state or (strict=True) a model key leaves model, optimizer and extras unchanged.
    Returns a Checkpoint (step, data_position, extra), or None when `path` is a directory
    holding no checkpoint (a fresh start).
    """
    if not isinstance(missing_ok, bool):
        raise TypeError(f"checkpoint.load: missing_ok must be True or False, got {missing_ok!r}")
    module = _unwrap(model, "checkpoint.load")
    sharded = _sharded.is_sharded_model(module)
    if optimizer is not None and not sharded and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"checkpoint.load: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    for name, obj in stateful.items():
        if not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(
                f"checkpoint.load: keyword argument {name!r} must have a load_state_dict() method, "
                f"got {type(obj).__name__}"
            )
    pg, rank, world = _group(process_group)
    path = os.fspath(path)
    is_dir = not os.path.isfile(path) and (os.path.isdir(path) or not path.endswith(".pt"))
    if not is_dir:
        directory = os.path.dirname(path) or "."
    else:
        directory = path
        # Rank 0 decides (it picks the files too) and every rank raises alike, never one alone.
        missing = torch.tensor([0 if os.path.isdir(path) else 1], dtype=torch.int64)
        if world > 1:
            dist.broadcast(missing, src=_global_rank(pg, 0), group=pg)
        if missing.item() and not missing_ok:
            raise FileNotFoundError(
                f"checkpoint.load: checkpoint directory {path} does not exist (on rank 0); pass "
                "missing_ok=True to allow a fresh start"
            )

    # Rank 0 picks the candidates (newest first) and the others follow it. See Note [Checkpoint agreement].
    candidates = []
    if rank == 0:
        if is_dir:
            candidates = [p for _, p in reversed(list_checkpoints(directory))]
        elif os.path.isfile(path):
            candidates = [path]
            m = _NAME.match(os.path.basename(path))
            if fallback and m:
                candidates += [
                    p for s, p in reversed(list_checkpoints(directory)) if s < int(m.group(1))
                ]
    failures = []
    for i in range(len(candidates) + 1 if rank == 0 else 2**62):
        file = _choose(
            candidates[i] if i < len(candidates) else None, pg, rank, world, path, directory
        )
        if file is None:
            break
        state, local_error = None, None
        try:
            state = read(file)
        except (CheckpointError, FileNotFoundError) as e:
            local_error = e
        bad_ranks, digests = _compare(state, pg, world)
        if not bad_ranks and len(set(digests)) == 1:
            return _apply(
                state, file, module, optimizer, stateful, strict, restore_rng, rank, world
            )
        if not bad_ranks:
            raise CheckpointError(
                f"ranks read different contents for checkpoint {file} (content checksums by rank: "
                f"{digests}); every rank must see the same file"
            )
        why = f"checkpoint file {file} could not be read on ranks {bad_ranks}"
        if local_error is not None:
            why = f"{local_error} (failed on ranks {bad_ranks})"
        failures.append(why)
        if not fallback:
            raise CheckpointError(
                f"{why}; pass fallback=True to load the previous checkpoint instead"
            ) from local_error
        warnings.warn(
            f"checkpoint.load: {why}; falling back to the previous checkpoint", stacklevel=2
        )
    if failures:
        raise CheckpointError("no readable checkpoint in " + directory + ": " + "; ".join(failures))
    if not is_dir:
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    return None


def _choose(candidate, pg, rank, world, given, directory):
    """Rank 0's next candidate file (None: no more), agreed by every rank."""
    if world == 1:
        return candidate
    # A candidate is sent as its step number, so that no path (or pickle) crosses the wire.
    code = torch.tensor([-1], dtype=torch.int64)
    if rank == 0 and candidate is not None:
        m = _NAME.match(os.path.basename(candidate))
        code[0] = int(m.group(1)) if m else -2
    dist.broadcast(code, src=_global_rank(pg, 0), group=pg)
    c = int(code.item())
    if rank == 0:
        return candidate
    return None if c == -1 else given if c == -2 else checkpoint_path(directory, c)


def _compare(state, pg, world):
    """All-gather (readable, content digest) across ranks: (ranks that failed, digests by rank)."""
    local = torch.zeros(1 + 32, dtype=torch.uint8)
    if state is not None:
        local[0] = 1
        local[1:] = torch.frombuffer(bytearray(bytes.fromhex(state["checksum"])), dtype=torch.uint8)
    if world == 1:
        rows = [local]
    else:
        rows = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(rows, local, group=pg)
    bad = [r for r, row in enumerate(rows) if row[0] == 0]
    return bad, [bytes(row[1:].tolist()).hex()[:16] for row in rows]


def _validate(state, file, module, optimizer, stateful, strict):
    """Every check that can fail, before _apply changes anything. See Note [Checkpoint errors]."""
    model_state = state["model"]
    consume_prefix_in_state_dict_if_present(model_state, "module.")
    own = module.state_dict()
    if strict:
        missing = [k for k in own if k not in model_state]
        unexpected = [k for k in model_state if k not in own]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {file} does not match the model: missing keys {missing}, unexpected "
                f"keys {unexpected}; nothing was loaded"
            )
    for k, v in model_state.items():
        mine = own.get(k)
        if isinstance(mine, torch.Tensor) and isinstance(v, torch.Tensor) and mine.shape != v.shape:
            raise CheckpointError(
                f"checkpoint {file}: {k!r} has shape {list(v.shape)} in the checkpoint and "
                f"{list(mine.shape)} in the model; nothing was loaded"
            )
    if optimizer is not None:
        saved = state["optimizer"]
        if saved is None:
            raise CheckpointError(
                f"checkpoint {file} holds no optimizer state, but an optimizer was passed; "
                "nothing was loaded"
            )
        groups = optimizer.state_dict()["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in saved["param_groups"]]:
            raise CheckpointError(
                f"checkpoint {file}: its optimizer state has parameter groups of sizes "
                f"{[len(g['params']) for g in saved['param_groups']]}, the optimizer "
                f"{[len(g['params']) for g in groups]}; nothing was loaded"
            )
    absent = [name for name in stateful if name not in state["extra"]]
    if absent:
        raise CheckpointError(
            f"checkpoint {file} holds no state for {', '.join(map(repr, absent))}; it holds {sorted(state['extra'])}; "
            "nothing was loaded"
        )


def _apply(state, file, module, optimizer, stateful, strict, restore_rng, rank, world):
    if _sharded.is_sharded_model(module):
        return _sharded.apply(state, file, module, optimizer, stateful, strict, restore_rng)
    if state.get("kind") == "sharded":
        raise CheckpointError(
            f"checkpoint {file} is sharded (written by a ShardedDataParallel model); load it into "
            "a ShardedDataParallel model, or get the full state_dict with "
            "torchlane.checkpoint.consolidate(file)"
        )
    state["model"] = _with_metadata(state)
    _validate(state, file, module, optimizer, stateful, strict)
    module.load_state_dict(state["model"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    for name, obj in stateful.items():
        obj.load_state_dict(state["extra"][name])
    if restore_rng:
        if state["world_size"] == world:
            _set_rng_state(state["rng"][rank])
        else:
            warnings.warn(
                f"checkpoint {file} was written by {state['world_size']} ranks and is loaded by {world}: "
                "RNG states are not restored",
                stacklevel=3,
            )
    extra = {k: v for k, v in state["extra"].items() if k not in stateful}
    return Checkpoint(
        path=file, step=state["step"], data_position=state["data_position"], extra=extra
    )


# ---------------------------------------------------------------------------------------------
# RNG states. See Note [Checkpoint RNG state].


def _get_rng_state():
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        assert kind == "MT19937"
        rng["numpy"] = {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "meta": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        }
    version, internal, gauss_next = random.getstate()
    rng["python"] = {
        "version": version,
        "state": torch.tensor(internal, dtype=torch.int64),
        "gauss": torch.tensor([gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
    }
    return rng


def _set_rng_state(rng):
    # A checkpoint written by the C++ API holds the torch generator's state only.
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng and np is not None:
        pos, has_gauss, cached = rng["numpy"]["meta"].tolist()
        keys = rng["numpy"]["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), cached))
    if "python" in rng:
        py = rng["python"]
        has, gauss = py["gauss"].tolist()
        random.setstate((py["version"], tuple(py["state"].tolist()), gauss if has else None))


def _rebuild(template, flat):
    """`template` (a nested RNG-state structure) with its tensors replaced, in pytree order, by
    the bytes of `flat`."""
    leaves, spec = tree_flatten(template)
    offset = 0
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            n = leaf.numel() * leaf.element_size()
            leaves[i] = flat[offset : offset + n].clone().view(leaf.dtype).reshape(leaf.shape)
            offset += n
    return tree_unflatten(leaves, spec)


def _gather_rng_states(pg, rank, world):
    local = _get_rng_state()
    if world == 1:
        return [local]
    tensors = [t for t in tree_flatten(local)[0] if isinstance(t, torch.Tensor)]
    flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([flat.numel()], dtype=torch.int64), group=pg)
    if len({int(s) for s in sizes}) != 1:
        raise CheckpointError(
            f"checkpoint.save: ranks have RNG states of different sizes {[int(s) for s in sizes]} "
            "(different CUDA device counts or library versions?)"
        )
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat, group=pg)
    # Every rank has the same structure (same libraries), so rank 0 unpacks the others' bytes
    # with its own layout.
    return [_rebuild(local, row) for row in rows]


# ---------------------------------------------------------------------------------------------
# helpers


def _check_step(step):
    check_int("step", step, 0, where="checkpoint.save")


def _unwrap(model, where):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "DistributedDataParallel" and isinstance(
            getattr(model, "module", None), torch.nn.Module
        ):
            model = model.module  # torchlane.DistributedDataParallel
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def _group(process_group):
    if not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise ValueError(
                "checkpoint: process_group was given but torch.distributed is not initialized"
            )
        return None, 0, 1
    pg = process_group if process_group is not None else dist.group.WORLD
    return pg, dist.get_rank(pg), dist.get_world_size(pg)


def _global_rank(pg, group_rank):
    return (
        dist.get_global_rank(pg, group_rank)
        if pg is not None and pg is not dist.group.WORLD
        else group_rank
    )


def _metadata_of(state_dict):
    """A state_dict's _metadata (module versions by prefix) as plain dicts."""
    return {k: dict(v) for k, v in getattr(state_dict, "_metadata", {}).items()}


def _with_metadata(state):
    """The checkpoint's model state_dict with its _metadata attached again (files written before
    "model_metadata" existed hold an OrderedDict that carries it)."""
    model = state["model"]
    metadata = state.get("model_metadata")
    if metadata is None or hasattr(model, "_metadata"):
        return model
    model = OrderedDict(model)
    model._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())
    return model


def _cpu(obj):
    """`obj` with every tensor detached and on the CPU (nested containers kept as they are)."""
    out = tree_map_only(
        torch.Tensor, lambda t: t.detach().cpu() if t.device.type != "cpu" else t.detach(), obj
    )
    if hasattr(obj, "_metadata"):  # a state_dict's module versions, read by _load_from_state_dict
        out._metadata = obj._metadata
    return out


def _check_replicas_agree(module, pg, rank, world):
    # Parameters only: buffers (BatchNorm statistics) legitimately differ between ranks after a
    # forward; DDP broadcasts rank 0's at the next one, and rank 0's are the ones saved.
    params = OrderedDict((name, p.detach()) for name, p in module.named_parameters())
    local = torch.frombuffer(bytearray(bytes.fromhex(_digest(params))), dtype=torch.uint8)
    rows = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(rows, local, group=pg)
    differ = [r for r, row in enumerate(rows) if not torch.equal(row, rows[0])]
    if differ:
        raise CheckpointError(
            f"checkpoint.save: the model parameters differ between ranks (ranks {differ} differ "
            "from rank 0); nothing was written"
        )


_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _digest(obj, where=None):
    """SHA-256 of a nested structure of tensors and plain values, independent of memory layout.

    With `where`, raises TypeError naming the first value that is not such a structure (those
    are exactly the values `torch.load(weights_only=True)` would refuse to load back).
    """
    h = hashlib.sha256()
    _feed(h, obj, where or "value")
    return h.hexdigest()


def _feed(h, obj, where):
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_quantized:
            raise TypeError(
                f"checkpoint: {where} is a {obj.layout} tensor; only dense tensors are supported"
            )
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif type(obj) in (dict, OrderedDict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k, f"{where} key {k!r}")
            _feed(h, v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple, torch.Size):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif type(obj) in _SCALARS:  # exact types: subclasses are pickled as their own class
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(
            f"checkpoint: {where} has type {type(obj).__name__}, which a weights_only checkpoint cannot "
            "hold; save tensors, numbers, strings, lists, tuples and dicts of those (or an object "
            "with a state_dict() method)"
        )


def _first_line(e):
    lines = [line.strip() for line in str(e).strip().splitlines()]
    for line in lines:
        if "WeightsUnpickler error" in line:
            return line
    return lines[0] if lines and lines[0] else repr(e)
