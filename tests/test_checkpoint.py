"""torchlane.checkpoint: exact resume, crash safety, corruption, keep-last-K, cross-rank agreement."""

import os
import pickle
import random
import shutil
import warnings

import dist
import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torchlane
from torchlane import checkpoint
from torchlane.checkpoint import CheckpointError

# torchlane's DDP once it exists; torch's until then (the checkpoint code handles both).
DDP = getattr(torchlane, "DistributedDataParallel", torch.nn.parallel.DistributedDataParallel)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.drop = torch.nn.Dropout(0.3)
        self.fc2 = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _batch():
    # Draws from all three RNGs, so a resume that restores any of them wrongly diverges.
    x = torch.randn(8, 16) + 0.1 * torch.from_numpy(np.random.randn(8, 16)).float()
    x[:, random.randrange(16)] = 0.0
    return x, torch.randint(0, 4, (8,))


def _seed(base, rank):
    torch.manual_seed(base + rank)
    np.random.seed(base + 1000 + rank)
    random.seed(base + 2000 + rank)


def _setup():
    model = DDP(Net())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, start, stop):
    for _ in range(start, stop):
        x, y = _batch()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _params(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _straight_and_first_half(rank, world, ckdir):
    _seed(1, rank)
    model, opt, sched = _setup()
    _train(model, opt, sched, 0, 20)
    straight = _params(model)

    _seed(1, rank)
    model, opt, sched = _setup()
    _train(model, opt, sched, 0, 10)
    checkpoint.save(ckdir, model, opt, 9, data_position=10, scheduler=sched, tag="half")
    # Plain pickle: tensors returned through dist.run's torch.multiprocessing queue would be
    # shared-memory handles that die with the worker.
    return pickle.dumps((straight, type(model).__module__))


def _resume(rank, world, ckdir):
    out = {}
    for restore_rng in (True, False):
        _seed(77, rank)  # different init and RNG streams: only the checkpoint can make it match
        model, opt, sched = _setup()
        info = checkpoint.load(ckdir, model, opt, restore_rng=restore_rng, scheduler=sched)
        assert (info.step, info.data_position, info.extra) == (9, 10, {"tag": "half"})
        _train(model, opt, sched, info.data_position, 20)
        out[restore_rng] = _params(model)
    return pickle.dumps(out)


def test_resume_is_bitwise_exact(tmp_path):
    """20 steps straight == 10 steps, save, new processes and process group, load, 10 steps."""
    first = [
        pickle.loads(r)
        for r in dist.run(_straight_and_first_half, world_size=2, args=(str(tmp_path),))
    ]
    resumed = [pickle.loads(r) for r in dist.run(_resume, world_size=2, args=(str(tmp_path),))]
    for rank in range(2):
        straight, ddp_module = first[rank]
        for name, value in straight.items():
            assert torch.equal(resumed[rank][True][name], value), (rank, name, ddp_module)
        # The test has teeth: without the RNG states (dropout, data) the run diverges.
        assert any(not torch.equal(resumed[rank][False][n], v) for n, v in straight.items()), (
            "restoring the RNG made no difference: the test does not exercise it"
        )
    # The file is an ordinary weights-only torch file whose model loads into a bare module.
    state = torch.load(checkpoint.checkpoint_path(tmp_path, 9), weights_only=True)
    Net().load_state_dict(state["model"])
    assert not any(k.startswith("module.") for k in state["model"])
    assert len(state["rng"]) == 2 and not torch.equal(
        state["rng"][0]["torch"], state["rng"][1]["torch"]
    )


# ---- single process: files, corruption, crash safety --------------------------------------


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    return model, opt


def _save_steps(directory, steps, **kw):
    model, opt = _model_and_opt()
    for s in steps:
        with torch.no_grad():
            model.fc1.bias.fill_(float(s))  # each checkpoint identifiable by its content
        checkpoint.save(directory, model, opt, s, **kw)
    return model, opt


def test_keep_last_k(tmp_path):
    _save_steps(tmp_path, range(0, 60, 10), keep_last=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [40, 50]
    _save_steps(tmp_path, [60, 70], keep_last=None)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [40, 50, 60, 70]
    _save_steps(tmp_path, [80], keep_last=1)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [80]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000080.pt"]  # no temporary files left


def test_load_restores_and_fresh_start(tmp_path):
    assert checkpoint.load(tmp_path / "none", Net(), missing_ok=True) is None
    assert checkpoint.load(tmp_path, Net()) is None  # an existing, empty directory: fresh start
    with pytest.raises(FileNotFoundError, match="ckpt-0000000005.pt"):
        checkpoint.load(checkpoint.checkpoint_path(tmp_path, 5), Net())
    model, opt = _save_steps(tmp_path, [3, 5])
    fresh, fresh_opt = _model_and_opt(seed=1)
    info = checkpoint.load(tmp_path, fresh, fresh_opt)
    assert info.step == 5 and info.path == checkpoint.checkpoint_path(tmp_path, 5)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        opt.state_dict()["state"][0]["momentum_buffer"],
        fresh_opt.state_dict()["state"][0]["momentum_buffer"],
    )
    info = checkpoint.load(checkpoint.checkpoint_path(tmp_path, 3), fresh)  # an explicit file
    assert info.step == 3 and fresh.fc1.bias[0].item() == 3.0


def _flip_a_tensor_byte(path):
    """Corrupt the data of the biggest tensor record inside the zip without breaking the zip."""
    data = bytearray(open(path, "rb").read())
    weight = _save_fc1_weight_bytes(path)
    at = data.find(weight)
    assert at > 0
    data[at + 17] ^= 0x40
    open(path, "wb").write(bytes(data))


def _save_fc1_weight_bytes(path):
    state = torch.load(path, weights_only=True)
    return state["model"]["fc1.weight"].numpy().tobytes()


def test_corrupt_and_truncated_files(tmp_path):
    _save_steps(tmp_path, [1, 2, 3])
    newest = checkpoint.checkpoint_path(tmp_path, 3)

    with open(newest, "r+b") as f:  # truncated, as a crash of a non-atomic writer would leave it
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.raises(CheckpointError, match=r"ckpt-0000000003\.pt cannot be loaded"):
        checkpoint.load(tmp_path, Net())
    with pytest.raises(CheckpointError, match=r"ckpt-0000000003\.pt"):
        checkpoint.read(newest)
    model = Net()
    with pytest.warns(UserWarning, match=r"ckpt-0000000003\.pt .*falling back"):
        info = checkpoint.load(tmp_path, model, fallback=True)
    assert info.step == 2 and model.fc1.bias[0].item() == 2.0

    _flip_a_tensor_byte(checkpoint.checkpoint_path(tmp_path, 2))  # loads, but the checksum differs
    with pytest.raises(
        CheckpointError, match=r"ckpt-0000000002\.pt is corrupt: its content checksum"
    ):
        checkpoint.read(checkpoint.checkpoint_path(tmp_path, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = checkpoint.load(tmp_path, model, fallback=True)
        assert info.step == 1
        # An explicit file falls back to the older ones in its directory too.
        assert checkpoint.load(newest, model, fallback=True).step == 1
    with open(checkpoint.checkpoint_path(tmp_path, 1), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no readable checkpoint"):
        checkpoint.load(tmp_path, model, fallback=True)

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="other.pt is not a torchlane checkpoint"):
        checkpoint.load(other, model)
    os.remove(other)
    torch.save({"evil": shutil.rmtree}, other)  # a pickle that would run code is refused
    with pytest.raises(CheckpointError, match="other.pt cannot be loaded"):
        checkpoint.read(other)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save_steps(tmp_path, [1])
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process is interrupted mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _save_steps(tmp_path, [2])
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [1]
    assert os.listdir(tmp_path) == ["ckpt-0000000001.pt"]
    # A temporary file left by a writer that was SIGKILLed is ignored, then cleaned up.
    open(tmp_path / ".ckpt-dead.tmp", "wb").write(b"partial")
    assert checkpoint.load(tmp_path, Net()).step == 1
    _save_steps(tmp_path, [2])
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000001.pt", "ckpt-0000000002.pt"]


def test_bad_arguments(tmp_path):
    model, opt = _model_and_opt()
    # torch's convention: TypeError for a wrong type, ValueError for a value out of range.
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        checkpoint.save(tmp_path, model, opt, -1)
    with pytest.raises(TypeError, match="step must be an int, got '3'"):
        checkpoint.save(tmp_path, model, opt, "3")
    with pytest.raises(ValueError, match="keep_last must be >= 1, got 0"):
        checkpoint.save(tmp_path, model, opt, 1, keep_last=0)
    with pytest.raises(TypeError, match="keep_last must be an int or None, got 1.5"):
        checkpoint.save(tmp_path, model, opt, 1, keep_last=1.5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        checkpoint.save(tmp_path, {}, opt, 1)
    with pytest.raises(
        TypeError, match="optimizer must be a torch.optim.Optimizer or None, got list"
    ):
        checkpoint.save(tmp_path, model, [], 1)
    with pytest.raises(TypeError, match=r"\['extra'\]\['hook'\] has type function"):
        checkpoint.save(tmp_path, model, opt, 1, hook=lambda: 0)
    assert checkpoint.list_checkpoints(tmp_path) == []
    checkpoint.save(tmp_path, model, None, 1)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        checkpoint.load(tmp_path, model, opt)
    with pytest.raises(TypeError, match="'sched' must have a load_state_dict"):
        checkpoint.load(tmp_path, model, sched=3)
    with pytest.raises(CheckpointError, match="holds no state for 'sched'"):
        checkpoint.load(tmp_path, model, sched=torch.optim.lr_scheduler.StepLR(opt, 1))


# ---- several ranks: agreement --------------------------------------------------------------


def _agreement(rank, world, root):
    shared = os.path.join(root, "shared")
    local = os.path.join(root, f"local{rank}")  # as on machines without a shared filesystem
    model, opt = _model_and_opt()
    model = DDP(model)
    results = {}

    checkpoint.save(shared, model, opt, 1)
    checkpoint.save(shared, model, opt, 2)
    results["both_load"] = checkpoint.load(shared, model, opt).step
    tdist.barrier()

    # Per-rank directories: rank 1 holds a truncated copy of step 2, or a different step 2.
    if rank == 0:
        for r in range(world):
            shutil.copytree(shared, os.path.join(root, f"local{r}"))
        bad = checkpoint.checkpoint_path(os.path.join(root, "local1"), 2)
        with open(bad, "r+b") as f:
            f.truncate(1000)
    tdist.barrier()
    try:
        checkpoint.load(local, model)
    except CheckpointError as e:
        results["truncated_on_1"] = str(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results["fallback"] = checkpoint.load(local, model, fallback=True).step
    tdist.barrier()
    if rank == 1:
        state = checkpoint.read(checkpoint.checkpoint_path(shared, 2))
        state.pop("checksum")
        state["model"]["fc1.bias"] += 1.0
        state["checksum"] = checkpoint._digest(state)  # valid file, different content
        torch.save(state, checkpoint.checkpoint_path(local, 2))
    tdist.barrier()
    try:
        checkpoint.load(local, model)
    except CheckpointError as e:
        results["different"] = str(e)

    # Buffers may differ between ranks (BatchNorm statistics after a forward): rank 0's are saved.
    torch.manual_seed(0)
    bn = DDP(torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4)))
    bn(torch.randn(8, 6) + rank).sum().backward()
    checkpoint.save(os.path.join(root, "bn"), bn, None, 0)
    saved = torch.load(checkpoint.checkpoint_path(os.path.join(root, "bn"), 0), weights_only=True)
    results["bn_saved_rank0_buffers"] = bool(
        torch.equal(saved["model"]["1.running_mean"], bn.module[1].running_mean)
    )

    # Replicas that diverged are refused, on every rank, before anything is written.
    with torch.no_grad():
        model.module.fc2.bias[0] += rank
    try:
        checkpoint.save(shared, model, opt, 3)
    except CheckpointError as e:
        results["diverged"] = str(e)
    results["steps_after"] = [s for s, _ in checkpoint.list_checkpoints(shared)]

    # Rank 0 cannot write (the directory is a file): every rank raises, none hangs.
    blocked = os.path.join(root, "blocked")
    if rank == 0:
        open(blocked, "w").close()
    tdist.barrier()
    try:
        checkpoint.save(blocked, model, opt, 4, verify_replicas=False)
    except Exception as e:
        results["write_failed"] = f"{type(e).__name__}: {e}"
    return results


def test_ranks_agree(tmp_path):
    res = dist.run(_agreement, world_size=2, args=(str(tmp_path),))
    for rank, r in enumerate(res):
        assert r["both_load"] == 2
        assert "on ranks [1]" in r["truncated_on_1"] and "ckpt-0000000002.pt" in r["truncated_on_1"]
        assert r["fallback"] == 1, "every rank must fall back to the same checkpoint"
        assert "ranks read different contents for checkpoint" in r["different"]
        assert "model parameters differ between ranks (ranks [1]" in r["diverged"]
        assert r["bn_saved_rank0_buffers"] == (rank == 0)
        assert r["steps_after"] == [1, 2]
        # Rank 0 names the file and the errno (see Note [Checkpoint errors]).
        expected = (
            "CheckpointError: checkpoint.save: writing"
            if rank == 0
            else "CheckpointError: rank 0 failed to write"
        )
        assert rank != 0 or "failed with EEXIST" in r["write_failed"], r["write_failed"]
        assert r["write_failed"].startswith(expected), r["write_failed"]
    assert "cannot be loaded" in res[1]["truncated_on_1"]  # the rank that saw it says why


def test_state_dict_metadata_round_trip(tmp_path):
    """The model state is stored as a plain dict (readable by the C++ API) with its module
    versions beside it; load hands them back to _load_from_state_dict, and files of the older
    layout (an OrderedDict carrying _metadata) still load."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model(torch.randn(4, 3))  # running statistics and num_batches_tracked change
    path = checkpoint.save(tmp_path, model, None, 0)
    raw = torch.load(path, weights_only=True)
    assert type(raw["model"]) is dict
    assert raw["model_metadata"]["1"]["version"] == torch.nn.BatchNorm1d._version

    seen = {}
    original = torch.nn.BatchNorm1d._load_from_state_dict

    def spy(self, state_dict, prefix, local_metadata, *args):
        seen[prefix] = local_metadata.get("version")
        return original(self, state_dict, prefix, local_metadata, *args)

    fresh = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    torch.nn.BatchNorm1d._load_from_state_dict = spy
    try:
        checkpoint.load(tmp_path, fresh)
    finally:
        torch.nn.BatchNorm1d._load_from_state_dict = original
    assert seen == {"1.": torch.nn.BatchNorm1d._version}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # The older layout: "model" an OrderedDict with _metadata, no "model_metadata".
    old = {k: v for k, v in raw.items() if k not in ("model_metadata", "checksum")}
    old["model"] = model.state_dict()
    old["checksum"] = checkpoint._digest(old)
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    torch.save(old, checkpoint.checkpoint_path(old_dir, 0))
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    checkpoint.load(old_dir, other)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
