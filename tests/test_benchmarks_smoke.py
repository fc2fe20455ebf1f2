"""The benchmark suite's pure parts against closed forms and torch's own bucket assignment, the
shaped-namespace runner's life cycle, one tiny end-to-end ddp_vs_torch.py run and one tiny
attention.py run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ddp_vs_torch  # noqa: E402
import netns  # noqa: E402
import scale_model as sm  # noqa: E402

MiB = 1024 * 1024


def test_ring_allreduce_closed_form():
    s, a, bw = 8e6, 1e-5, 1e9
    assert sm.ring_allreduce_s(s, 1, a, bw) == 0.0
    assert sm.ring_allreduce_s(s, 2, a, bw) == pytest.approx(2 * a + s / bw)
    # n ranks: 2(n-1) steps of S/n each.
    assert sm.ring_allreduce_s(s, 8, a, bw) == pytest.approx(14 * a + 14 * s / 8 / bw)
    # Shared medium (the shaped loopback): every rank's bytes through one queue.
    assert sm.ring_allreduce_s(s, 4, a, bw, shared_medium=True) == pytest.approx(6 * a + 6 * s / bw)
    # Large n: bandwidth term tends to 2 S / B.
    assert sm.ring_allreduce_s(s, 1024, 0.0, bw) == pytest.approx(2 * s / bw, rel=1e-3)
    with pytest.raises(ValueError, match="n must be"):
        sm.ring_allreduce_s(s, 0, a, bw)


@pytest.mark.parametrize("seed", range(5))
def test_bucket_plan_matches_torch(seed):
    g = torch.Generator().manual_seed(seed)
    numels = torch.randint(1, 600_000, (40,), generator=g).tolist()
    order = torch.randperm(40, generator=g).tolist()
    sizes = [n * 4 for n in numels]
    for first, cap in ((1 * MiB, 25 * MiB), (1 * MiB, 2 * MiB), (100, 3 * MiB)):
        ours = sm.bucket_plan(sizes, cap, first, order=order)
        tensors = [torch.empty(numels[i]) for i in order]
        theirs, _ = dist._compute_bucket_assignment_by_size(tensors, [first, cap])
        assert ours == [[order[j] for j in b] for b in theirs]
    # Default order: reverse registration.
    assert sm.bucket_plan([4, 4, 4], 8, 4) == [[2], [1, 0]]
    with pytest.raises(ValueError, match="caps must be > 0"):
        sm.bucket_plan(sizes, 0)
    with pytest.raises(ValueError, match="permutation"):
        sm.bucket_plan([4, 4], 8, order=[0, 0])


def test_simulate_step_closed_forms():
    # Everything ready at the end of backward: fully serial.
    step, end = sm.simulate_step([1.0, 1.0], [0.2, 0.3], 0.5, 1.0, 0.1)
    assert step == pytest.approx(0.5 + 1.0 + 0.5 + 0.1) and end == pytest.approx(1.5)
    # Comm hidden: bucket 0 ready at 0.1, done 0.3; bucket 1 ready at 0.5, done 0.7 < backward.
    step, end = sm.simulate_step([0.1, 0.5], [0.2, 0.2], 0.5, 1.0, 0.1)
    assert step == pytest.approx(1.6) and end == pytest.approx(0.7)
    # Queueing: bucket 1 waits for bucket 0 to finish.
    _, end = sm.simulate_step([0.0, 0.1], [1.0, 1.0], 0.0, 0.0, 0.0)
    assert end == pytest.approx(2.0)


def test_predict_and_extrapolate():
    prof = {
        "forward_ms": 10.0,
        "backward_ms": 20.0,
        "optimizer_ms": 5.0,
        "param_ready_ms": [20.0, 20.0],
        "param_bytes": [4 * MiB, 4 * MiB],
    }
    # Both params ready at the end of backward, one 25 MiB bucket... plus the 1 MiB first bucket.
    bw, alpha = 1e9 / 8, 0.0
    t = sm.predict(prof, 2, alpha, bw)
    assert t == pytest.approx(0.035 + 8 * MiB / bw)
    assert sm.predict(prof, 2, alpha, bw, bytes_scale=0.5) == pytest.approx(0.035 + 4 * MiB / bw)
    rows = sm.extrapolate(prof)
    assert {r["world_size"] for r in rows} == set(sm.WORLD_SIZES)
    assert all(0 < r["efficiency"] <= 1 for r in rows)


def test_efficiency_closed_form():
    assert ddp_vs_torch.efficiency(100, 50, 100) == pytest.approx(1.0)  # fully hidden
    assert ddp_vs_torch.efficiency(100, 50, 150) == pytest.approx(0.0)  # fully serial
    assert ddp_vs_torch.efficiency(100, 50, 125) == pytest.approx(0.5)
    assert ddp_vs_torch.efficiency(None, 50, 125) is None


def test_tbf_args():
    args = netns.tbf_args(200)
    assert args[:2] == ["rate", "200mbit"]
    assert int(args[3]) >= 65536  # a full loopback packet must fit in the bucket
    with pytest.raises(ValueError, match="link_mbit"):
        netns.tbf_args(0)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None, reason="needs root and iproute2"
)
def test_shaped_namespace_life_cycle():
    with netns.shaped_namespace(123) as ns:
        assert ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        qdisc = subprocess.run(
            ["tc", "-n", ns, "qdisc", "show", "dev", "lo"], capture_output=True, text=True
        ).stdout
        assert "tbf" in qdisc and "123Mbit" in qdisc
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_not_root_message(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.NetnsUnavailable, match="needs root"):
        netns.check_available()


@pytest.fixture(scope="module")
def tiny_ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "ddp.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "ddp_vs_torch.py"),
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--bucket-cap-mb",
        "0.01,25",
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def test_ddp_vs_torch_end_to_end(tiny_ddp_run):
    res = tiny_ddp_run
    for key in ("bare_ms", "torch_ms", "torchlane_ms", "ratio"):
        assert key in res
    assert res["bare_ms"] > 0 and res["torch_ms"] > 0
    assert [row["bucket_cap_mb"] for row in res["results"]] == [0.01, 25.0]
    prof = res["profile"]
    assert len(prof["param_ready_ms"]) == len(prof["param_bytes"]) == len(prof["param_names"])
    assert sum(prof["param_bytes"]) == res["grad_bytes"] == 4 * res["params"]


def test_report_renders(tiny_ddp_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import run_all

    run = dict(tiny_ddp_run)
    (tmp_path / "ddp_loopback_n2.json").write_text(json.dumps(run))
    (tmp_path / "ddp_size_1M.json").write_text(json.dumps(run))
    # Pretend the same run was on a shaped link, so the link sections and the scale model render.
    shaped = dict(run, link_mbit=200.0)
    (tmp_path / "ddp_link200_n2_hook-none.json").write_text(json.dumps(shaped))
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    monkeypatch.chdir(ROOT)
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/scale_model.py",
            str(tmp_path / "ddp_link200_n2_hook-none.json"),
            "--out",
            str(tmp_path / "scale_model.json"),
            "--plot",
            str(tmp_path / "scale_model.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    run_all.report({}, quick=False)
    summary = (tmp_path / "summary.md").read_text()
    for heading in (
        "torch DDP vs torchlane DDP",
        "Step time vs model size",
        "Gradient compression",
        "Scaling model",
    ):
        assert heading in summary
    for png in ("step_time_vs_size.png", "hooks.png", "scale_model.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.fixture(scope="module")
def tiny_attention_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention") / "attention.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "attention.py"),
        *("--seqs", "32", "64", "--dims", "16", "--dtypes", "fp32", "bf16", "--causal", "both"),
        *("--batch", "1", "--heads", "2", "--threads", "1", "--rounds", "2", "--stat", "median"),
        *("--matmul-size", "64", "--memory-seq", "0", "--out", str(out)),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def test_attention_end_to_end(tiny_attention_run):
    res = tiny_attention_run
    assert (res["device"], res["batch"], res["heads"], res["threads"]) == ("cpu", 1, 2, 1)
    assert (res["rounds"], res["stat"]) == (2, "median")
    configs = [(r["dtype"], r["S"], r["D"], r["causal"], r["backward"]) for r in res["rows"]]
    assert configs == [
        (dt, s, 16, causal, backward)
        for dt in ("fp32", "bf16")
        for s in (32, 64)
        for causal in (False, True)
        for backward in (False, True)
    ]
    for r in res["rows"]:
        assert set(r["ms"]) == set(r["gflops"]) == {"torchlane", "sdpa", "math"}
        assert all(v > 0 for v in r["ms"].values())
        assert r["ratio_sdpa"] == pytest.approx(r["ms"]["sdpa"] / r["ms"]["torchlane"])
        assert r["frac_matmul"] == pytest.approx(r["gflops"]["torchlane"] / r["matmul_gflops"])
        assert r["frac_matmul_fp32"] == pytest.approx(
            r["gflops"]["torchlane"] / r["matmul_fp32_gflops"]
        )
        if r["dtype"] == "fp32":  # the one matmul serves both
            assert r["matmul_fp32_gflops"] == r["matmul_gflops"]
    assert (res["peak_extra_mib_S"], res["peak_extra_mib"]) == (0, {})


@pytest.mark.parametrize("backward", [False, True])
def test_attention_peak_memory_child(backward, capsys):
    # In process: the --memory-seq runs spawn one fresh interpreter per measurement, too slow here.
    import attention

    attention.peak_memory_child("torchlane", 64, "fp32", backward, "cpu")
    assert float(capsys.readouterr().out) >= 0


def test_run_all_attention_command_is_the_sweep():
    import attention
    import run_all

    for quick in (False, True):
        (argv,) = [argv for part, _, argv in run_all.commands(quick) if part == "attention"]
        assert argv[1] == "benchmarks/attention.py"
        a = attention.parse_args(argv[2:])
        assert (a.seqs, a.dims, a.dtypes, a.causal) == (
            [128, 256, 512, 1024, 2048],
            [64],
            ["fp32"],
            "yes",
        )
        assert (a.batch, a.heads, a.threads, a.device, a.stat) == (1, 4, 1, "cpu", "median")
        assert (a.memory_seq, a.no_math, a.out) == (
            0,
            True,
            "benchmarks/results/attention_seq.json",
        )
        assert a.rounds == (2 if quick else 5)


def test_attention_report_renders(tiny_attention_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import run_all

    (tmp_path / "attention_seq.json").write_text(json.dumps(tiny_attention_run))
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    run_all.report({}, quick=False)
    summary = (tmp_path / "summary.md").read_text()
    assert "## Attention: torchlane.attention vs SDPA" in summary
    assert "`python benchmarks/attention.py --seqs 128 256 512 1024 2048" in summary
    assert "| bf16 | 64 | 16 | yes | fwd+bwd |" in summary
    assert (tmp_path / "attention.png").stat().st_size > 1000


def test_topk_convergence_end_to_end(tmp_path):
    out = tmp_path / "topk.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "topk_convergence.py"),
        "--seeds",
        "0",
        "--steps",
        "12",
        "--recipes",
        "0.1-start10",
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| 0.1-start10 | ratio=0.1, start_iter=10 |" in r.stdout
    res = json.loads(out.read_text())
    (row,) = res["recipes"]
    assert res["steps"] == 12 and res["seeds"] == [0] and len(row["losses"]) == 1
    # 10 dense steps (fraction 1) and 2 top-k steps (about 0.2 each): about 0.87 on average.
    assert 10 / 12 < row["bytes_sent_fraction"] < 11 / 12
    bad = subprocess.run(cmd[:2] + ["--recipes", "0.2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown recipe '0.2'" in bad.stderr
