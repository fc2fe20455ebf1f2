"""A torchrun job whose worker is SIGKILLed mid-run restarts, resumes and ends bitwise-exact."""

import os
import signal
import subprocess
import sys
import time

import dist
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TRAINER = os.path.join(HERE, "restart_trainer.py")


def _torchrun(tmp_path, name, *extra):
    env = dist.subprocess_env(HERE, OMP_NUM_THREADS="1")
    # torchrun shares its rendezvous TCPStore with the workers by default, and a restarted
    # worker group then reads the previous attempt's Gloo/NCCL addresses from it and fails to
    # connect (pytorch/pytorch#135712, still so in torch 2.13). Opting out gives each attempt
    # its own store. The README's restart recipe says the same.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "1", "--monitor-interval", "0.2", TRAINER,
        "--ckpt-dir", str(tmp_path / f"{name}_ckpt"), "--out", str(tmp_path / f"{name}.pt"), *extra,
    ]  # fmt: skip
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, tmp_path, name, timeout):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    log = (tmp_path / f"{name}.log").read_text()
    assert rc == 0, f"torchrun {name} ended with {rc}:\n{log[-4000:]}"
    return torch.load(tmp_path / f"{name}.pt", weights_only=True), log


def test_sigkilled_worker_restarts_and_matches_uninterrupted_run(tmp_path):
    pid_file = tmp_path / "victim.pid"
    # One job at a time: two --standalone jobs started together can race for the same free
    # port, and the loser's restart made the reference run flaky (attempt 1 instead of 0).
    victim = _torchrun(tmp_path, "victim", "--stall-at", "7", "--pid-file", str(pid_file))
    deadline = time.monotonic() + 120
    while not pid_file.exists():
        assert victim.poll() is None, (tmp_path / "victim.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "the worker never reached the step where it is killed"
        time.sleep(0.1)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)

    got, log = _finish(victim, tmp_path, "victim", timeout=120)
    ref, _ = _finish(_torchrun(tmp_path, "reference"), tmp_path, "reference", timeout=120)
    assert (ref["attempt"], ref["resumed_from"]) == (0, 0)
    # Restarted once, from the checkpoint written after step 5 (saves every 3 steps).
    assert got["attempt"] == 1 and got["resumed_from"] == 6, log[-4000:]
    assert "attempt 1: starting at step 6" in log
    for name, value in ref["params"].items():
        assert torch.equal(got["params"][name], value), name
