"""Training monitor: per-rank JSONL metrics, straggler report, hang watchdog, trace and plot.

    mon = torchlane.monitor.Monitor(run_dir, ddp_model, watchdog_timeout=30.0)
    for batch in loader:
        mon.start_step()
        loss = loss_fn(ddp_model(batch))
        mon.mark("forward")
        loss.backward()
        mon.mark("backward")
        opt.step()
        mon.end_step(loss=loss, tokens=n_tokens)
    mon.close()

    python -m torchlane.monitor RUN_DIR     # straggler report, hang reports, RUN_DIR/run.png

Every rank appends one JSON line per step to ``RUN_DIR/rank{r}.jsonl``: wall time, step time,
forward / backward / optimizer split (from the marks), the reducer's view of the backward
(``backward_end_ms``: first gradient hook to the last bucket launch; ``comm_wait_ms``: how long
the communication outlasted the backward, from ``comm_stats()``), bytes sent, the gradient norm
and the loss. The cost is one ``reducer.stats()`` call, one norm over the gradients (optional)
and one buffered write per step; nothing is communicated.

The straggler report compares ranks by their *compute* time (forward + backward up to the last
bucket launch): the wall-clock step time is the same on every rank, because all of them wait for
the slowest at the all-reduce.

The hang watchdog (Note [Hang watchdog]) is a daemon thread per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

from torchlane._validate import check_int, check_real

__all__ = [
    "Monitor",
    "HangWatchdog",
    "read_run",
    "straggler_report",
    "hang_reports",
    "export_chrome_trace",
    "plot_run",
    "main",
]


def _check_run_dir(run_dir) -> str:
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir must be a path, got {type(run_dir).__name__}")
    return os.fspath(run_dir)


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _reducer_of(ddp):
    reducer = getattr(ddp, "_reducer", None)
    if reducer is None or not hasattr(reducer, "flight_record"):
        raise TypeError(
            f"ddp must be a torchlane.DistributedDataParallel (or None), got {type(ddp).__name__}"
        )
    return reducer


class Monitor:
    """Per-rank step metrics as JSONL (see the module docstring).

    Args:
        run_dir: directory for ``rank{r}.jsonl`` (created).
        ddp: the torchlane.DistributedDataParallel model, or None (then no reducer fields).
        rank: default the process group rank (0 without one).
        grad_norm: record the global L2 norm of this rank's gradients after backward.
        buckets: also record the per-bucket (ready, launch, done) times (for the trace export).
        watchdog_timeout: seconds after which an unfinished bucket collective triggers a hang
            report (:class:`HangWatchdog`); None disables the watchdog.
    """

    def __init__(
        self,
        run_dir,
        ddp=None,
        rank: int | None = None,
        grad_norm: bool = True,
        buckets: bool = True,
        watchdog_timeout: float | None = None,
        watchdog_poll: float = 0.2,
    ):
        self.run_dir = _check_run_dir(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self._reducer = _reducer_of(ddp) if ddp is not None else None
        self.ddp = ddp
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        check_int("rank", rank, 0)
        self.rank = rank
        self.grad_norm, self.buckets = bool(grad_norm), bool(buckets)
        self._file = open(os.path.join(self.run_dir, f"rank{rank}.jsonl"), "a", buffering=1 << 16)
        self.step_index = 0
        self._t0 = None
        self._marks: dict[str, float] = {}
        self._grad_norm = None
        self.watchdog = None
        if watchdog_timeout is not None:
            if ddp is None:
                raise ValueError("watchdog_timeout needs ddp (the reducer's flight record)")
            self.watchdog = HangWatchdog(
                self.run_dir, ddp, rank=rank, timeout=watchdog_timeout, poll=watchdog_poll
            )
            self.watchdog.start()

    def start_step(self) -> None:
        self._t0 = time.perf_counter()
        self._marks = {}
        self._grad_norm = None

    def mark(self, phase: str) -> None:
        """End of a phase ("forward", "backward", ...) of the current step."""
        if self._t0 is None:
            raise RuntimeError("Monitor.mark called before start_step")
        self._marks[str(phase)] = time.perf_counter()
        if phase == "backward" and self.grad_norm:
            self._grad_norm = self._compute_grad_norm()

    def _compute_grad_norm(self):
        module = self.ddp.module if self.ddp is not None else None
        grads = [p.grad for p in module.parameters() if p.grad is not None] if module else []
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

    def end_step(self, loss=None, tokens: int | None = None, **extra) -> dict:
        if self._t0 is None:
            raise RuntimeError("Monitor.end_step called before start_step")
        end = time.perf_counter()
        rec = {"step": self.step_index, "rank": self.rank, "time": time.time()}
        rec["step_ms"] = (end - self._t0) * 1e3
        prev = self._t0
        for name, t in self._marks.items():
            rec[f"{name}_ms"] = (t - prev) * 1e3
            prev = t
        if self._marks:
            rec["rest_ms"] = (end - prev) * 1e3
        if loss is not None:
            rec["loss"] = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        if tokens is not None:
            rec["tokens"] = int(tokens)
        if self._reducer is not None:
            s = self._reducer.stats()
            rec["backward_end_ms"] = s["backward_end_ms"]
            rec["comm_wait_ms"] = max(0.0, s["comm_end_ms"] - s["backward_end_ms"])
            rec["bytes_sent"] = s["bytes_sent"]
            if self.buckets:
                rec["buckets"] = [
                    [e["ready_ms"], e["launch_ms"], e["done_ms"]] for e in s["bucket_events"]
                ]
        if self.grad_norm:
            # Taken at mark("backward") (before the optimizer may zero the gradients), else now.
            norm = self._grad_norm if "backward" in self._marks else self._compute_grad_norm()
            if norm is not None:
                rec["grad_norm"] = norm
        rec.update(extra)
        self._file.write(json.dumps(rec) + "\n")
        self.step_index += 1
        self._t0 = None
        return rec

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HangWatchdog(threading.Thread):
    """Writes a hang report when a bucket collective stays unfinished for ``timeout`` seconds.

    Note [Hang watchdog]: every ``poll`` seconds the thread reads the reducer's flight record
    (Note [Flight record] in csrc/reducer/flight_record.hpp: last launched and last completed
    bucket collective, their sequence numbers; lock-free, so it works while the backward thread
    is blocked) and writes it with a heartbeat to ``RUN_DIR/flight_rank{r}.json``. When this
    rank's last launched collective is older than ``timeout`` and not completed, it reads every
    rank's flight file and writes ``RUN_DIR/hang_rank{r}.json`` (and a line to stderr): the stuck
    bucket, its size and sequence number, and for every other rank its last launched / completed
    collective and heartbeat age. A rank whose last launched sequence number is below the stuck
    one did not arrive; a rank whose heartbeat is stale (older than ``3 * poll + 1`` s) is not
    responding (stopped, or dead). Pick ``timeout`` below the process group's timeout so the
    report comes before the timeout error. The run directory must be shared by the ranks (one
    host, or a shared filesystem).
    """

    def __init__(self, run_dir, ddp, rank: int | None = None, timeout=30.0, poll=0.2):
        super().__init__(daemon=True, name="torchlane-hang-watchdog")
        self.run_dir = _check_run_dir(run_dir)
        self._reducer = _reducer_of(ddp)
        check_real("watchdog_timeout", timeout, positive=True)
        check_real("watchdog_poll", poll, positive=True)
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.rank, self.timeout, self.poll = rank, float(timeout), float(poll)
        self.world_size = (
            torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        )
        self._stop_event = threading.Event()
        self.reported_seq = 0
        self.reports: list[dict] = []

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5 * self.poll + 1)

    def run(self) -> None:
        path = os.path.join(self.run_dir, f"flight_rank{self.rank}.json")
        waiting_since, waiting_seq = None, 0
        while not self._stop_event.wait(self.poll):
            rec = dict(self._reducer.flight_record())
            rec["rank"], rec["heartbeat"] = self.rank, time.time()
            _write_json_atomic(path, rec)
            oldest = rec["completed_seq"] + 1  # the oldest unfinished collective, if any
            if rec["launched_seq"] < oldest:
                waiting_since = None
                continue
            if waiting_since is None or waiting_seq != oldest:
                waiting_since, waiting_seq = time.monotonic(), oldest
            age = time.monotonic() - waiting_since
            if age > self.timeout and oldest > self.reported_seq:
                self.reported_seq = oldest
                self.report(rec, oldest, age)

    def report(self, rec: dict, seq: int, age: float) -> dict:
        """Write the hang report for collective ``seq`` (see Note [Hang watchdog])."""
        now = time.time()
        stale = 3 * self.poll + 1.0
        bucket = seq - rec["iteration_first_seq"]
        try:
            nbytes = self._reducer.buckets()[bucket]["bytes"]
        except (IndexError, KeyError, TypeError):
            nbytes = rec["launched_bytes"] if bucket == rec["launched_bucket"] else None
        peers, late, silent = {}, [], []
        for r in range(self.world_size):
            try:
                with open(os.path.join(self.run_dir, f"flight_rank{r}.json")) as f:
                    peer = json.load(f)
            except (OSError, ValueError):
                peer = None
            peers[r] = peer
            if r == self.rank:
                continue
            if peer is None or now - peer["heartbeat"] > stale:
                silent.append(r)
            if peer is None or peer["launched_seq"] < seq:
                late.append(r)
        keys = ("launched_seq", "launched_bucket", "completed_seq", "completed_bucket", "iteration")
        out = {
            "rank": self.rank,
            "time": now,
            "stuck_seq": seq,
            "stuck_bucket": bucket,
            "stuck_bytes": nbytes,
            "stuck_for_s": age,
            "iteration": rec["iteration"],
            "last_launched_seq": rec["launched_seq"],
            "last_launched_bucket": rec["launched_bucket"],
            "last_completed_seq": rec["completed_seq"],
            "last_completed_bucket": rec["completed_bucket"],
            "ranks_not_arrived": late,
            "ranks_not_responding": silent,
            "peers": {
                str(r): None
                if p is None
                else {k: p[k] for k in keys} | {"heartbeat_age_s": now - p["heartbeat"]}
                for r, p in peers.items()
            },
        }
        _write_json_atomic(os.path.join(self.run_dir, f"hang_rank{self.rank}.json"), out)
        print(f"torchlane monitor: {_describe_hang(out)}", file=sys.stderr, flush=True)
        self.reports.append(out)
        return out


def _describe_hang(h: dict) -> str:
    return (
        f"rank {h['rank']} has waited {h['stuck_for_s']:.1f}s for bucket {h['stuck_bucket']} "
        f"({h['stuck_bytes']} bytes, collective #{h['stuck_seq']}, iteration {h['iteration']}); "
        f"ranks that did not arrive: {h['ranks_not_arrived']}; "
        f"not responding: {h['ranks_not_responding']}"
    )


def read_run(run_dir) -> dict[int, list[dict]]:
    """{rank: [step records]} from ``RUN_DIR/rank*.jsonl`` (a torn last line is skipped)."""
    run_dir = _check_run_dir(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run_dir {run_dir!r} is not a directory")
    out = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("rank") and name.endswith(".jsonl"):
            rank = int(name[4:-6])
            recs = []
            with open(os.path.join(run_dir, name)) as f:
                for line in f:
                    try:
                        recs.append(json.loads(line))
                    except ValueError:
                        pass
            out[rank] = recs
    return dict(sorted(out.items()))


def compute_ms(rec: dict) -> float:
    """A rank's own work in a step: forward + backward up to the last bucket launch (falls back
    to forward + backward marks, then to the step time)."""
    if "forward_ms" in rec and "backward_end_ms" in rec:
        return rec["forward_ms"] + rec["backward_end_ms"]
    if "forward_ms" in rec and "backward_ms" in rec:
        return rec["forward_ms"] + rec["backward_ms"] - rec.get("comm_wait_ms", 0.0)
    return rec["step_ms"]


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return 0.0 if n == 0 else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def straggler_report(
    runs: dict[int, list[dict]],
    threshold: float = 1.2,
    patience: int = 3,
    min_excess_ms: float = 1.0,
):
    """Per rank: median compute ms and its ratio to the median of the other ranks; a rank is
    slow in a step when its ratio exceeds ``threshold`` and it is at least ``min_excess_ms``
    slower (sub-millisecond jitter is not a straggler), a straggler when it is slow for
    ``patience`` consecutive steps and its median ratio from there on exceeds ``threshold``;
    ``since_step`` is the first step of that run."""
    if not runs:
        raise ValueError("no rank*.jsonl records to report on")
    steps = sorted(set.intersection(*({r["step"] for r in recs} for recs in runs.values())))
    by = {rank: {r["step"]: compute_ms(r) for r in recs} for rank, recs in runs.items()}
    out = {"steps": len(steps), "ranks": {}, "stragglers": []}
    for rank in runs:
        ratios, slow = [], []
        for s in steps:
            others = (
                _median([by[o][s] for o in runs if o != rank]) if len(runs) > 1 else by[rank][s]
            )
            ratios.append(by[rank][s] / max(others, 1e-9))
            slow.append(ratios[-1] > threshold and by[rank][s] - others >= min_excess_ms)
        # The first run of `patience` slow steps after which the rank stays slower in the
        # median (a burst of noise is not a straggler).
        since, run_len = None, 0
        for j, is_slow in enumerate(slow):
            run_len = run_len + 1 if is_slow else 0
            if run_len >= patience and since is None:
                first = j - patience + 1
                if _median(ratios[first:]) > threshold:
                    since = steps[first]
        out["ranks"][rank] = {
            "median_compute_ms": _median([by[rank][s] for s in steps]),
            "median_step_ms": _median([r["step_ms"] for r in runs[rank]]),
            "median_ratio_to_others": _median(ratios),
            "since_step": since,
        }
        if since is not None:
            out["stragglers"].append(rank)
    return out


def hang_reports(run_dir) -> list[dict]:
    run_dir = _check_run_dir(run_dir)
    out = []
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("hang_rank") and name.endswith(".json"):
            with open(os.path.join(run_dir, name)) as f:
                out.append(json.load(f))
    return out


def export_chrome_trace(runs: dict[int, list[dict]], step: int, path) -> str:
    """Write one step of every rank as Chrome/Perfetto trace JSON (open in ui.perfetto.dev).

    One process per rank; thread 0 holds the phases (forward, backward, ...), thread 1 the
    bucket all-reduces. Bucket times are relative to the first gradient hook, which is placed at
    the end of the forward mark (the hook fires at the start of backward)."""
    events = []
    for rank, recs in runs.items():
        rec = next((r for r in recs if r["step"] == step), None)
        if rec is None:
            raise ValueError(f"step {step} is not in rank {rank}'s records")
        t = 0.0
        events.append(
            {"ph": "M", "pid": rank, "name": "process_name", "args": {"name": f"rank {rank}"}}
        )
        for key in [k for k in rec if k.endswith("_ms")]:
            if key in ("step_ms", "backward_end_ms", "comm_wait_ms"):
                continue
            dur = rec[key] * 1e3
            events.append({"ph": "X", "pid": rank, "tid": 0, "name": key[:-3], "ts": t, "dur": dur})
            t += dur
        origin = rec.get("forward_ms", 0.0) * 1e3
        for b, (_ready, launch, done) in enumerate(rec.get("buckets", [])):
            events.append(
                {
                    "ph": "X",
                    "pid": rank,
                    "tid": 1,
                    "name": f"allreduce bucket {b}",
                    "ts": origin + launch * 1e3,
                    "dur": max(done - launch, 0.0) * 1e3,
                }
            )
    path = os.fspath(path)
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return path


def plot_run(runs: dict[int, list[dict]], path) -> str | None:
    """PNG of compute time, step time and loss per rank; None (and a message) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("torchlane monitor: matplotlib is not installed, skipping the plot", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for rank, recs in runs.items():
        steps = [r["step"] for r in recs]
        axes[0].plot(steps, [compute_ms(r) for r in recs], label=f"rank {rank}")
        axes[1].plot(steps, [r["step_ms"] for r in recs], label=f"rank {rank}")
        if all("loss" in r for r in recs):
            axes[2].plot(steps, [r["loss"] for r in recs], label=f"rank {rank}")
    for ax, title in zip(axes, ["compute ms (fwd + bwd)", "step ms", "loss"], strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m torchlane.monitor", description="Report on a torchlane monitor run."
    )
    p.add_argument("run_dir")
    p.add_argument("--threshold", type=float, default=1.2, help="straggler ratio (default 1.2)")
    p.add_argument(
        "--min-excess-ms",
        type=float,
        default=1.0,
        help="a slow step is also at least this many ms slower (default 1.0)",
    )
    p.add_argument("--trace-step", type=int, default=None, help="export this step as a trace")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    runs = read_run(args.run_dir)
    for h in hang_reports(args.run_dir):
        print(f"HANG: {_describe_hang(h)}")
    if not runs:
        print(f"no rank*.jsonl in {args.run_dir}")
        return 1
    rep = straggler_report(runs, threshold=args.threshold, min_excess_ms=args.min_excess_ms)
    print(f"{rep['steps']} steps on {len(runs)} ranks")
    for rank, r in rep["ranks"].items():
        flag = f"  STRAGGLER since step {r['since_step']}" if r["since_step"] is not None else ""
        print(
            f"rank {rank}: compute {r['median_compute_ms']:.1f} ms (x{r['median_ratio_to_others']:.2f}"
            f" of the others), step {r['median_step_ms']:.1f} ms{flag}"
        )
    if not rep["stragglers"]:
        print("no straggler")
    step = args.trace_step if args.trace_step is not None else max(rep["steps"] - 1, 0)
    if rep["steps"]:
        print("trace:", export_chrome_trace(runs, step, os.path.join(args.run_dir, "trace.json")))
    if not args.no_plot:
        png = plot_run(runs, os.path.join(args.run_dir, "run.png"))
        if png:
            print("plot:", png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
