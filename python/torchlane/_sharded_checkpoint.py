"""Sharded checkpoints of torchlane.ShardedDataParallel, behind torchlane.checkpoint.save/load.

Note [Sharded checkpoint files]
A sharded checkpoint of step s is N+1 files in the checkpoint directory:
  ckpt-<s>.shard-<r>-of-<N>.pt  one per rank r: its master shard of every bucket and its
                                optimizer state on that shard (ShardedOptimizer.shard_state),
                                with a SHA-256 checksum of its content, as every checkpoint file
  ckpt-<s>.pt                   the manifest, written by rank 0 last: the bucket layout (state_dict
                                key, shape and numel of every parameter, in flat order), the
                                replicated state (buffers, frozen parameters), the optimizer's
                                group options, data position, extras, every rank's RNG state,
                                and the checksum of every shard file.
Every file is written to a temporary name, fsynced and renamed into place (the same writer as a
plain checkpoint); the manifest is written only once every rank reported its shard file durable,
so the newest ckpt-*.pt is always a complete checkpoint, and list_checkpoints / load / retention
work on manifests exactly as on plain files (a removed checkpoint takes its shard files along).

Loading is resharding: rank r' of N' ranks needs the elements [r' S', (r'+1) S') of every flat
bucket (S' its new shard length); parameter by parameter (the bucket plan may differ too), it
maps them to the old flat buckets and reads only the old shard files that hold them, each
verified against the checksum the manifest holds. Everything is validated and every rank's
reads are agreed on (an all-reduce of a failure flag) before anything is applied, so a missing or
corrupt shard file raises CheckpointError on every rank and changes nothing.
`consolidate(file)` assembles the full, unsharded state_dict from the files alone (no process
group), loadable by the plain nn.Module.
"""

import glob
import os
import re
from collections import OrderedDict

import torch
import torch.distributed as dist

from torchlane import _C
from torchlane import checkpoint as ck

SHARD_FORMAT = "torchlane.checkpoint.shard/1"


def shard_path(directory, step, rank, world):
    return os.path.join(os.fspath(directory), f"ckpt-{step:010d}.shard-{rank}-of-{world}.pt")


def shard_files(manifest_path):
    """The shard files that belong to a manifest path (any world size)."""
    base = os.path.basename(manifest_path)
    if not base.endswith(".pt"):
        return []
    stem = glob.escape(os.path.join(os.path.dirname(manifest_path), base[: -len(".pt")]))
    return [p for p in glob.glob(stem + ".shard-*-of-*.pt") if _SHARD.match(os.path.basename(p))]


_SHARD = re.compile(r"^ckpt-\d+\.shard-\d+-of-\d+\.pt$")


def is_sharded_model(model):
    from torchlane.sharding import ShardedDataParallel

    return isinstance(model, ShardedDataParallel)


def _layout(model):
    """Per bucket, (state_dict key, shape) of each parameter in flat order; and every key that
    names a trainable parameter (tied weights have several) -> (bucket, position)."""
    module = model.module
    names = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    buckets, aliases = [], {}
    for b, bucket in enumerate(model._buckets):
        entries = []
        for j, i in enumerate(bucket):
            p = model._params[i]
            entries.append((names[id(p)][0], list(p.shape)))
            for name in names[id(p)]:
                aliases[name] = (b, j)
        buckets.append(entries)
    return buckets, aliases


def _cpu_state(st):
    return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}


# ---------------------------------------------------------------------------------------------
# save


def save(path, model, optimizer, step, *, data_position, keep_last, discard_newer, extra):
    """checkpoint.save for a ShardedDataParallel model: see Note [Sharded checkpoint files]."""
    from torchlane.sharding import ShardedOptimizer

    if optimizer is not None and not isinstance(optimizer, ShardedOptimizer):
        raise TypeError(
            "checkpoint.save: the optimizer of a ShardedDataParallel model must be its "
            f"torchlane.ShardedOptimizer (or None), got {type(optimizer).__name__}"
        )
    if optimizer is not None and optimizer.model is not model:
        raise ValueError("checkpoint.save: optimizer was built on another ShardedDataParallel")
    pg, rank, world = model.process_group, model.rank, model.world_size
    directory = os.fspath(path)
    target = ck.checkpoint_path(directory, step)

    # Rank 0 refuses before anything is written (Note [Checkpoint retention]).
    newer, error = [], None
    if rank == 0:
        newer = [(s, p) for s, p in ck.list_checkpoints(directory) if s > step]
        if newer and not discard_newer:
            error = ck.CheckpointError(
                f"checkpoint.save: {directory} holds checkpoints of higher steps "
                f"{[s for s, _ in newer]} than step {step}; `load` would resume from those. "
                "Pass discard_newer=True to replace them by this one, or save elsewhere. "
                "Nothing was written"
            )
    _raise_if_any(error, pg, world, f"rank 0 refused to write checkpoint {target}")

    rngs = ck._gather_rng_states(pg, rank, world)
    # Optimizer state completed across ranks, so every shard file holds the same entries.
    states = optimizer._agreed_shard_states() if optimizer is not None else None
    shard = {
        "format": SHARD_FORMAT,
        "step": int(step),
        "rank": rank,
        "world_size": world,
        "params": [s.detach().cpu().clone() for s in model._shards],
        "optim": [_cpu_state(st) for st in states] if states is not None else None,
    }
    mine = shard_path(directory, step, rank, world)
    error = None
    try:
        shard["checksum"] = ck._digest(shard, where="checkpoint shard")
        ck._write_atomically(directory, mine, shard, prefix=f".shard-{rank}-")
    except BaseException as e:  # noqa: B036 - the other ranks must learn about any failure
        error = e
    digests = _gather_digests(shard.get("checksum") if error is None else None, pg, world)
    failed = [r for r, d in enumerate(digests) if d is None]
    if failed:
        if error is None and os.path.exists(mine):
            os.remove(mine)
        if error is not None:
            raise error
        raise ck.CheckpointError(
            f"checkpoint.save: ranks {failed} failed to write their shard of {target} (see "
            "their errors); no checkpoint was written"
        )

    error = None
    if rank == 0:
        try:
            buckets, aliases = _layout(model)
            replicated = model.replicated_state_dict()
            manifest = {
                "format": ck.FORMAT,
                "kind": "sharded",
                "step": int(step),
                "world_size": world,
                "torch_version": str(torch.__version__),
                "model": ck._cpu(replicated),
                "keys": list(model.module.state_dict().keys()),
                "layout": {"buckets": buckets, "aliases": aliases, "stage": model.stage},
                "shards": digests,
                "optimizer": (
                    {"param_groups": optimizer.group_options()} if optimizer is not None else None
                ),
                "data_position": data_position,
                "extra": {k: ck._extra_state(k, v) for k, v in extra.items()},
                "rng": rngs,
            }
            manifest["checksum"] = ck._digest(manifest, where="checkpoint")
            ck._write_atomically(directory, target, manifest)
            for _, old in newer:  # discard_newer=True: only once the new checkpoint is durable
                ck._remove_checkpoint(old)
            if keep_last is not None:
                for _, old in ck.list_checkpoints(directory)[:-keep_last]:
                    if old != target:
                        ck._remove_checkpoint(old)
        except BaseException as e:  # noqa: B036
            error = e
    _raise_if_any(error, pg, world, f"rank 0 failed to write checkpoint {target}")
    return target


def _raise_if_any(error, pg, world, message):
    """Raises on every rank if any rank has an error (its own error where it has one)."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    if world > 1:
        dist.all_reduce(flag, group=pg)
    if error is not None:
        raise error
    if flag.item():
        raise ck.CheckpointError(f"{message} (see that rank's error)")


def _gather_digests(digest, pg, world):
    local = torch.zeros(33, dtype=torch.uint8)
    if digest is not None:
        local[0] = 1
        local[1:] = torch.frombuffer(bytearray(bytes.fromhex(digest)), dtype=torch.uint8)
    rows = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(rows, local, group=pg)
    return [bytes(row[1:].tolist()).hex() if row[0] else None for row in rows]


# ---------------------------------------------------------------------------------------------
# load


def read_shard(file, expected):
    """One verified shard file: its own checksum and the manifest's must both match."""
    state = ck.read_any(file, SHARD_FORMAT)
    if state["checksum"] != expected:
        raise ck.CheckpointError(
            f"checkpoint shard {file} does not belong to its manifest: its checksum is "
            f"{state['checksum'][:16]}..., the manifest expects {str(expected)[:16]}..."
        )
    return state


def _old_layouts(manifest):
    world = manifest["world_size"]
    numels = [[_numel(shape) for _, shape in b] for b in manifest["layout"]["buckets"]]
    return [_C.shard_layout(n, world) for n in numels], numels


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def apply(manifest, file, model, optimizer, stateful, strict, restore_rng):
    """checkpoint.load's last part for a ShardedDataParallel model (collective)."""
    from torchlane.sharding import ShardedOptimizer, _elementwise

    if optimizer is not None and not isinstance(optimizer, ShardedOptimizer):
        raise TypeError(
            "checkpoint.load: the optimizer of a ShardedDataParallel model must be its "
            f"torchlane.ShardedOptimizer (or None), got {type(optimizer).__name__}"
        )
    pg, rank, world = model.process_group, model.rank, model.world_size
    error, plan = None, None
    try:
        plan = _read_plan(manifest, file, model, optimizer, stateful, strict)
    except BaseException as e:  # noqa: B036 - every rank raises, never one alone
        error = e
    _raise_if_any(error, pg, world, f"checkpoint {file} could not be loaded on another rank")
    params, states = plan
    with torch.no_grad():
        for b, shard in enumerate(model._shards):
            shard.copy_(params[b].to(shard.dtype))
            if optimizer is not None:
                optimizer.load_shard_state(
                    b,
                    {
                        k: (
                            v.to(shard.dtype)
                            if _elementwise(v, shard.numel()) and v.is_floating_point()
                            else v
                        )
                        for k, v in states[b].items()
                    },
                )
        if optimizer is not None:
            optimizer.load_group_options(manifest["optimizer"]["param_groups"])
        model.load_replicated_state_dict(manifest["model"])
    model._refresh_params()
    for name, obj in stateful.items():
        obj.load_state_dict(manifest["extra"][name])
    if restore_rng:
        if manifest["world_size"] == world:
            ck._set_rng_state(manifest["rng"][rank])
        else:
            import warnings

            warnings.warn(
                f"checkpoint {file} was written by {manifest['world_size']} ranks and is loaded "
                f"by {world}: RNG states are not restored",
                stacklevel=4,
            )
    extra = {k: v for k, v in manifest["extra"].items() if k not in stateful}
    return ck.Checkpoint(
        path=file, step=manifest["step"], data_position=manifest["data_position"], extra=extra
    )


def _read_plan(manifest, file, model, optimizer, stateful, strict):
    """Validates the manifest against the model and reads this rank's new shards from the old
    shard files that overlap them: ([param shard per bucket], [optimizer shard state per bucket])."""
    if manifest.get("kind") != "sharded":
        raise ck.CheckpointError(
            f"checkpoint {file} is not sharded (it was written from an unsharded model); load it "
            "into the plain module, then wrap that in ShardedDataParallel"
        )
    buckets, aliases = _layout(model)
    saved = {name: tuple(shape) for b in manifest["layout"]["buckets"] for name, shape in b}
    mine = {name: tuple(shape) for b in buckets for name, shape in b}
    if saved != mine:
        raise ck.CheckpointError(
            f"checkpoint {file}: its sharded parameters do not match this model's: missing "
            f"{sorted(set(mine) - set(saved))}, unexpected {sorted(set(saved) - set(mine))}, "
            f"different shapes {sorted(k for k in mine if k in saved and mine[k] != saved[k])}; "
            "nothing was loaded"
        )
    own = [k for k in model.module.state_dict() if k not in aliases]
    if strict:
        missing = [k for k in own if k not in manifest["model"]]
        unexpected = [k for k in manifest["model"] if k not in own]
        if missing or unexpected:
            raise ck.CheckpointError(
                f"checkpoint {file} does not match the model: missing keys {missing}, unexpected "
                f"keys {unexpected}; nothing was loaded"
            )
    if optimizer is not None and manifest["optimizer"] is None:
        raise ck.CheckpointError(
            f"checkpoint {file} holds no optimizer state, but an optimizer was passed; "
            "nothing was loaded"
        )
    if optimizer is not None and len(manifest["optimizer"]["param_groups"]) != len(
        optimizer.param_groups
    ):
        raise ck.CheckpointError(
            f"checkpoint {file}: its optimizer has {len(manifest['optimizer']['param_groups'])} "
            f"parameter groups, this one {len(optimizer.param_groups)}; nothing was loaded"
        )
    absent = [name for name in stateful if name not in manifest["extra"]]
    if absent:
        raise ck.CheckpointError(
            f"checkpoint {file} holds no state for {', '.join(map(repr, absent))}; nothing was "
            "loaded"
        )

    old_world = manifest["world_size"]
    old_layouts, _ = _old_layouts(manifest)
    directory = os.path.dirname(file)
    cache = {}

    def old_shard(r):
        if r not in cache:
            cache[r] = read_shard(
                shard_path(directory, manifest["step"], r, old_world), manifest["shards"][r]
            )
        return cache[r]

    # Where each parameter lives in the old flat buckets: the bucket plan may differ (another
    # bucket_cap_mb), so elements are mapped parameter by parameter.
    where = {}
    for ob, entries in enumerate(manifest["layout"]["buckets"]):
        for (name, _shape), off in zip(entries, old_layouts[ob][0], strict=True):
            where[name] = (ob, off)

    def elementwise(v, ob):
        return torch.is_tensor(v) and v.dim() == 1 and v.numel() == old_layouts[ob][3]

    params, states = [], []
    for b, shard in enumerate(model._shards):
        offsets, numel, _, new_len = model._layouts[b]
        start = model.rank * new_len
        stop = min(start + new_len, numel)
        p = torch.zeros(new_len, dtype=shard.dtype)
        st = {}
        for (name, shape), off in zip(buckets[b], offsets, strict=True):
            lo, hi = max(start, off), min(stop, off + _numel(shape))
            if lo >= hi:
                continue
            ob, old_off = where[name]
            old_len = old_layouts[ob][3]
            old_lo = old_off + lo - off
            for r in range(old_world):
                a, z = max(old_lo, r * old_len), min(old_lo + hi - lo, (r + 1) * old_len)
                if a >= z:
                    continue  # this old shard holds none of these elements: not read
                src = old_shard(r)
                dst = slice(a - old_lo + lo - start, z - old_lo + lo - start)
                p[dst] = src["params"][ob][a - r * old_len : z - r * old_len]
                if optimizer is None:
                    continue
                for k, v in src["optim"][ob].items():
                    if elementwise(v, ob):
                        if k not in st:
                            st[k] = torch.zeros(new_len, dtype=v.dtype)
                        st[k][dst] = v[a - r * old_len : z - r * old_len]
                    else:
                        st.setdefault(k, v)
        if optimizer is not None and not st:
            # Only padding on this rank: the entries (zeros, step) as old rank 0's first bucket.
            for k, v in old_shard(0)["optim"][0].items():
                st[k] = torch.zeros(new_len, dtype=v.dtype) if elementwise(v, 0) else v
        params.append(p.to(shard.device))
        states.append(st)
    return params, states


def consolidate(file):
    """The full, unsharded state_dict of a sharded checkpoint manifest (CPU tensors), read from
    the files alone; loadable by the plain nn.Module (`module.load_state_dict(...)`)."""
    manifest = ck.read(file)
    if manifest.get("kind") != "sharded":
        return manifest["model"]
    world = manifest["world_size"]
    layouts, _ = _old_layouts(manifest)
    directory = os.path.dirname(os.fspath(file)) or "."
    shards = [
        read_shard(shard_path(directory, manifest["step"], r, world), manifest["shards"][r])
        for r in range(world)
    ]
    full = {}
    for b, entries in enumerate(manifest["layout"]["buckets"]):
        offsets, numel = layouts[b][0], layouts[b][1]
        flat = torch.cat([s["params"][b] for s in shards])[:numel]
        for (name, shape), off in zip(entries, offsets, strict=True):
            full[name] = flat[off : off + _numel(shape)].view(shape).clone()
    by_position = {}
    for b, entries in enumerate(manifest["layout"]["buckets"]):
        for j, (name, _) in enumerate(entries):
            by_position[(b, j)] = full[name]
    out = OrderedDict()
    for k in manifest["keys"]:
        if k in manifest["model"]:
            out[k] = manifest["model"][k]
        else:
            out[k] = by_position[tuple(manifest["layout"]["aliases"][k])]
    return out
