"""Regression tests of issue #16 (fault injection): checkpoint retention and errors, options that
must agree across ranks. See docs/reliability.md for the rule each test pins down."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import dist
import pytest
import torch
import torchlane
from torchlane import checkpoint
from torchlane.checkpoint import CheckpointError


def _lin(n=4, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Linear(n, n)
    return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


# ---- 1. a save never deletes the file it wrote ------------------------------------------------


def test_save_of_lower_step_refuses_or_replaces_newer(tmp_path):
    m, opt = _lin()
    for s in (8, 9, 10):
        checkpoint.save(tmp_path, m, opt, s)
    with torch.no_grad():
        m.weight.fill_(6.0)
    with pytest.raises(CheckpointError, match=r"higher steps \[8, 9, 10\] than step 6"):
        checkpoint.save(tmp_path, m, opt, 6)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [8, 9, 10]
    p = checkpoint.save(tmp_path, m, opt, 6, discard_newer=True)
    assert os.path.exists(p)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [6]
    fresh, fresh_opt = _lin(seed=1)
    assert checkpoint.load(tmp_path, fresh, fresh_opt).step == 6
    assert torch.equal(fresh.weight, torch.full((4, 4), 6.0))
    # keep_last counts the new file and never removes it.
    p = checkpoint.save(tmp_path, m, opt, 7, keep_last=1)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [7] and os.path.exists(p)


# ---- 6. clear errors, no partial state -------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only); else None."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_disk_full_raises_checkpoint_error_and_keeps_old(small_disk, tmp_path, monkeypatch):
    target = small_disk if small_disk is not None else tmp_path / "ckpt"
    small, small_opt = _lin(4)
    first = checkpoint.save(target, small, small_opt, 1)
    before = open(first, "rb").read()
    big, big_opt = _lin(256)  # 256 KiB of weights: does not fit in 64 KiB
    if small_disk is None:  # no tmpfs: the plain write fails as a full disk would
        real = checkpoint._write_file

        def full(directory, path, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        monkeypatch.setattr(checkpoint, "_write_file", full)
    with pytest.raises(CheckpointError, match=r"ckpt-0000000002\.pt failed with ENOSPC"):
        checkpoint.save(target, big, big_opt, 2)
    if small_disk is None:
        monkeypatch.setattr(checkpoint, "_write_file", real)
    assert sorted(os.listdir(target)) == ["ckpt-0000000001.pt"]  # no temporary file left
    assert open(first, "rb").read() == before
    fresh, fresh_opt = _lin(4, seed=3)
    assert checkpoint.load(target, fresh, fresh_opt).step == 1
    assert torch.equal(fresh.weight, small.weight)


def test_load_validates_everything_before_applying(tmp_path):
    m, opt = _lin()
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    checkpoint.save(tmp_path, m, opt, 1)  # no scheduler saved
    fresh, fresh_opt = _lin(seed=5)
    fresh(torch.randn(2, 4)).sum().backward()
    fresh_opt.step()
    weight = fresh.weight.detach().clone()
    momentum = fresh_opt.state_dict()["state"][0]["momentum_buffer"].clone()
    sched = torch.optim.lr_scheduler.StepLR(fresh_opt, 1)
    with pytest.raises(CheckpointError, match="holds no state for 'scheduler'.*nothing was loaded"):
        checkpoint.load(tmp_path, fresh, fresh_opt, scheduler=sched)
    assert torch.equal(fresh.weight, weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"], momentum)
    # A model whose keys differ: nothing is loaded either (strict=True).
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = other[0].weight.detach().clone()
    with pytest.raises(CheckpointError, match="missing keys"):
        checkpoint.load(tmp_path, other, None)
    assert torch.equal(other[0].weight, before)


def test_load_of_missing_directory_needs_opt_in(tmp_path):
    m, opt = _lin()
    with pytest.raises(FileNotFoundError, match="does not exist.*missing_ok=True"):
        checkpoint.load(tmp_path / "typo", m, opt)
    assert checkpoint.load(tmp_path / "typo", m, opt, missing_ok=True) is None
    assert not (tmp_path / "typo").exists()


# ---- 4. options that decide collective sizes must agree across ranks --------------------------


_RANK_LOCAL_OPTIONS = [
    ("bucket_cap_mb", (0.01, 25)),  # was: Gloo SIGABRT on rank 1
    ("find_unused_parameters", (False, True)),
    ("static_graph", (False, True)),
    ("check_finite", (True, False)),
    ("broadcast_buffers", (True, False)),
]


def _rank_local_options(rank, world):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    # 6. was an unreadable pybind error; 1e13 MiB does not fit in int64 bytes.
    with pytest.raises(ValueError, match=r"bucket_cap_mb must be .* < 2\*\*40 MiB, got 1"):
        torchlane.DistributedDataParallel(model, bucket_cap_mb=1e13)
    for option, values in _RANK_LOCAL_OPTIONS:
        with pytest.raises(ValueError, match=f"{option} must be the same on every rank.*rank 0: "):
            torchlane.DistributedDataParallel(model, **{option: values[rank]})
    # The same options on every rank train normally afterwards (nothing was left half-built).
    ddp = torchlane.DistributedDataParallel(model, bucket_cap_mb=0.01)
    ddp(torch.randn(3, 64)).sum().backward()
    for kind in ("powersgd", "topk", "cast"):
        ddp = torchlane.DistributedDataParallel(torch.nn.Linear(32, 32))
        if kind == "powersgd":
            state = torchlane.hooks.PowerSGDState(rank=1 + rank, start_powerSGD_iter=2)
            hook, match = (
                torchlane.hooks.powersgd,
                r"powersgd: state must be the same.*rank=1,.*rank=2,",
            )
        elif kind == "topk":
            state = torchlane.hooks.TopKState(ratio=0.1 * (rank + 1))
            hook, match = torchlane.hooks.topk, "topk: state must be the same.*ratio=0.1.*ratio=0.2"
        else:  # a different hook on each rank
            state = None
            hook = torchlane.hooks.bf16_compress if rank == 0 else torchlane.hooks.fp16_compress
            match = "hook must be the same.*'bf16_compress'.*'fp16_compress'"
        with pytest.raises(ValueError, match=match):
            ddp.register_comm_hook(state, hook)
    return True


def test_options_that_size_collectives_must_agree_across_ranks():
    assert dist.run(_rank_local_options, 2) == [True, True]


# ---- 3. a non-finite step leaves the hooks' state as it was -----------------------------------


def _run_with_hook(rank, kind, skip_step=None, nan_step=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 4),
    )  # fmt: skip
    # A small cap: several buckets, so the rollback covers more than one bucket's memory.
    ddp = torchlane.DistributedDataParallel(model, check_finite=True, bucket_cap_mb=0.004)
    if kind == "powersgd":
        state = torchlane.hooks.PowerSGDState(rank=2, start_powerSGD_iter=2, warm_start=True)
        ddp.register_comm_hook(state, torchlane.hooks.powersgd)
    elif kind == "powersgd-cold":
        state = torchlane.hooks.PowerSGDState(rank=1, start_powerSGD_iter=2, warm_start=False)
        ddp.register_comm_hook(state, torchlane.hooks.powersgd)
    else:
        state = torchlane.hooks.TopKState(ratio=0.05, start_iter=1, ratio_warmup_iters=2)
        ddp.register_comm_hook(state, torchlane.hooks.topk)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    trace = []
    for step in range(9):
        if step == skip_step:
            continue
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        if step == nan_step and rank == 1:
            x[0, 0] = float("nan")
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        if ddp.grads_finite:
            opt.step()
        else:
            assert step == nan_step, f"step {step} is non-finite: the NaN of step {nan_step} stayed"
        if step > 4:
            trace.append((loss.detach().clone(), [p.detach().clone() for p in ddp.parameters()]))
    return trace, state.iter


def _nan_rollback_job(rank, world):
    out = {}
    for kind in ("powersgd", "powersgd-cold", "topk"):
        got, got_iter = _run_with_hook(rank, kind, nan_step=4)
        want, want_iter = _run_with_hook(rank, kind, skip_step=4)
        assert got_iter == want_iter, (kind, got_iter, want_iter)
        for (gl, gp), (wl, wp) in zip(got, want, strict=True):
            assert torch.isfinite(gl) and torch.equal(gl, wl), (kind, gl, wl)
            assert all(torch.equal(a, b) for a, b in zip(gp, wp, strict=True)), kind
        out[kind] = len(got)
    return out


def test_nan_step_leaves_hook_state_untouched():
    # NaN on rank 1 at step 4: steps 5.. are finite and bitwise those of a run without step 4.
    assert dist.run(_nan_rollback_job, 2) == [{"powersgd": 4, "powersgd-cold": 4, "topk": 4}] * 2


# ---- 2. train_gpt.py under torchrun --max-restarts: resume auto -------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT_FLAGS = [
    "--max-data-mb", "0.2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
    "--block-size", "32", "--batch-size", "4", "--eval-batches", "1", "--eval-every", "1000",
    "--sample-tokens", "4", "--warmup-steps", "2", "--max-steps", "40", "--ckpt-every", "4",
    "--dropout", "0.1", "--no-progress", "--ddp", "torchlane",
]  # fmt: skip


def _gpt_job(out_dir):
    env = dist.subprocess_env(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "2", "--monitor-interval", "0.2",
        os.path.join(ROOT, "examples", "train_gpt.py"), *GPT_FLAGS, "--out-dir", str(out_dir),
    ]  # fmt: skip
    log = open(str(out_dir) + ".log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait(proc, out_dir, timeout=240):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    text = open(str(out_dir) + ".log").read()
    assert rc == 0, f"torchrun ended with {rc}:\n{text[-4000:]}"
    records = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    final = torch.load(checkpoint.checkpoint_path(out_dir / "checkpoints", 40), weights_only=True)
    return records, final, text


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def _tensors_equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _tensors_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.skipif(not hasattr(torchlane, "DistributedDataParallel"), reason="needs the build")
def test_train_gpt_sigkilled_worker_resumes_bitwise(tmp_path):
    victim_dir = tmp_path / "victim"
    proc = _gpt_job(victim_dir)
    first = checkpoint.checkpoint_path(victim_dir / "checkpoints", 4)
    deadline = time.monotonic() + 180
    while not os.path.exists(first):
        assert proc.poll() is None, open(str(victim_dir) + ".log").read()[-4000:]
        assert time.monotonic() < deadline, "the job never wrote its first checkpoint"
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    got_log, got, text = _wait(proc, victim_dir)
    want_log, want, _ = _wait(_gpt_job(tmp_path / "reference"), tmp_path / "reference")

    resumed = [r for r in got_log if r["type"] == "config" and r["resumed_at"] is not None]
    assert resumed and resumed[-1]["attempt"] >= 1, text[-4000:]  # restarted, and resumed
    start = resumed[-1]["resumed_at"]
    assert 4 <= start < 40
    # Losses after the resume point (the restarted attempt's lines, appended) equal the straight run's.
    want_loss = {r["step"]: r["loss"] for r in want_log if r["type"] == "train"}
    got_loss = {r["step"]: r["loss"] for r in got_log if r["type"] == "train"}  # last one wins
    assert sorted(got_loss) == list(range(1, 41))  # the log was appended to, not overwritten
    assert all(got_loss[s] == want_loss[s] for s in range(1, 41)), (got_loss, want_loss)
    _tensors_equal(got["model"], want["model"], "model")
    _tensors_equal(got["optimizer"], want["optimizer"], "optimizer")
