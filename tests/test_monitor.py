"""torchlane.monitor: per-rank JSONL, straggler report, trace export, CLI, hang watchdog."""

import json
import os
import subprocess
import sys
import time

import dist
import pytest
import torch.multiprocessing as mp
from monitor_cases import hang_one_rank, train_monitored
from torchlane import monitor


def test_records_report_trace_and_cli(tmp_path):
    run = str(tmp_path)
    dist.run(train_monitored, 2, args=(run, 7, 1, 0.15))
    runs = monitor.read_run(run)
    assert sorted(runs) == [0, 1] and all(len(r) == 7 for r in runs.values())
    rec = runs[0][3]
    for key in (
        "step_ms",
        "forward_ms",
        "backward_ms",
        "backward_end_ms",
        "comm_wait_ms",
        "bytes_sent",
        "grad_norm",
        "loss",
        "buckets",
    ):
        assert key in rec, key
    assert rec["bytes_sent"] == 4 * (64 * 64 + 64) * 4  # every gradient, fp32, once
    # Rank 1 sleeps 150 ms in forward from step 2 on. A loaded machine can make a tiny step a
    # few ms slower on either rank (step 0 warms up), so onset is judged at a 50 ms excess.
    rep = monitor.straggler_report(runs, min_excess_ms=50.0)
    assert rep["stragglers"] == [1]
    assert rep["ranks"][1]["since_step"] in (1, 2)
    assert rep["ranks"][1]["median_ratio_to_others"] > 1.5
    trace = monitor.export_chrome_trace(runs, 3, tmp_path / "t.json")
    events = json.load(open(trace))["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1}
    assert any(e["name"].startswith("allreduce bucket") for e in events)
    with pytest.raises(ValueError, match="step 99"):
        monitor.export_chrome_trace(runs, 99, tmp_path / "u.json")
    env = dist.subprocess_env()
    out = subprocess.run(
        [sys.executable, "-m", "torchlane.monitor", run, "--min-excess-ms", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    since = rep["ranks"][1]["since_step"]
    assert "rank 1" in out.stdout and f"STRAGGLER since step {since}" in out.stdout
    assert os.path.exists(os.path.join(run, "trace.json"))
    try:
        import matplotlib  # noqa: F401

        assert os.path.exists(os.path.join(run, "run.png"))
    except ImportError:
        assert "matplotlib is not installed" in out.stderr


def test_watchdog_names_stuck_bucket_and_missing_rank(tmp_path):
    """Rank 1 SIGSTOPs itself mid-backward; rank 0's watchdog (3 s) reports before the
    process group's timeout (12 s) raises."""
    run = str(tmp_path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = dist.free_port()
    procs = [
        ctx.Process(
            target=dist._worker,
            args=(r, 2, port, hang_one_rank, (run, 3.0), queue, 12, {}),
            daemon=True,
        )
        for r in range(2)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:
        rank, ok, value = queue.get(timeout=150)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    import pickle

    assert rank == 0 and ok, value
    res = pickle.loads(value)
    assert res is not None, "rank 0 finished without the timeout error"
    assert "hang_rank0.json" in res["hang_files"]  # written before the timeout error
    (rep,) = res["reports"]
    assert rep["ranks_not_arrived"] == [1] and rep["ranks_not_responding"] == [1]
    # Rank 1 stopped when module[1]'s input gradient was due: the buckets of layers 3 and 2
    # finished, the first bucket holding a layer-1 parameter is the stuck one.
    buckets = res["buckets"]
    first_l1 = min(b["index"] for b in buckets if any(n.startswith("1.") for n in b["params"]))
    assert rep["stuck_bucket"] == first_l1, (rep, buckets)
    assert rep["stuck_bytes"] == buckets[first_l1]["bytes"]
    assert rep["peers"]["1"]["launched_seq"] < rep["stuck_seq"] <= rep["last_launched_seq"]
    assert time.monotonic() - start < 150


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="ddp"):
        monitor.Monitor(tmp_path, ddp=object())
    with pytest.raises(TypeError, match="run_dir"):
        monitor.Monitor(3)
    with pytest.raises(ValueError, match="watchdog_timeout needs ddp"):
        monitor.Monitor(tmp_path, watchdog_timeout=1.0)
    m = monitor.Monitor(tmp_path, rank=0)
    with pytest.raises(RuntimeError, match="before start_step"):
        m.mark("forward")
    m.close()
    with pytest.raises(FileNotFoundError, match="run_dir"):
        monitor.read_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="no rank"):
        monitor.straggler_report({})
