"""Pipeline parallelism: bubbles, activation memory, balancing, and torch's own pipelining.

    python benchmarks/pipeline.py            # launches its ranks itself (Gloo on 127.0.0.1)

Parts (JSON to benchmarks/results/pipeline.json, the 1F1B timeline to pipeline_timeline.png):

  bubble     4 stages of "sleep layers" (forward sleeps t_f, backward 2 t_f: fixed costs that do
             not compete for the CPU), GPipe and 1F1B at m = 4, 8, 16 micro-batches: the bubble
             fraction measured from each stage's timeline, 1 - busy / step, next to the formula
             (p - 1) / (m + p - 1).
  memory     GPT (examples/gpt.py) on 4 stages, m = 8: the peak bytes of saved activations per
             stage (counted by saved-tensor hooks), GPipe vs 1F1B.
  balance    an uneven GPT (4 blocks, an 8192-token vocabulary: the head dominates)
             on 2 stages: step time and slowest stage's compute, balance="even" vs "profile".
  dynamic    GPT on 2 stages with rank 1 slowed (every layer it runs sleeps): step time without
             and with dynamic re-balancing.
  torch      the same GPT and split through torch.distributed.pipelining (PipelineStage,
             ScheduleGPipe / Schedule1F1B) and torchlane: step time ratio and the losses.

Timings come from a shared machine (2 cores, other jobs running): read them as rough.
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "python")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

# ----------------------------------------------------------------------------- models


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t_f):
        ctx.t_f = t_f
        time.sleep(t_f)
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        time.sleep(2 * ctx.t_f)
        return g * 1.0, None


class SleepLayer(nn.Module):
    """A layer with a fixed cost: forward sleeps t_f, backward 2 t_f (a transformer's ratio)."""

    def __init__(self, t_f, width=16):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.t_f = t_f

    def forward(self, x):
        return _Sleep.apply(self.lin(x), self.t_f)


def _gpt(vocab=256, n_layer=4, n_embd=64, seed=0):
    from gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab, 32, n_layer, 2, n_embd, 0.0, "sdpa"))


def _batch(vocab, b=8, s=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g), torch.randint(
        0, vocab, (b, s), generator=g
    )


def _bubble(stats_all):
    """Mean over stages of 1 - busy / step, the step being the slowest stage's wall time."""
    step = max(s["step_s"] for s in stats_all)
    return statistics.mean(1 - s["compute_s"] / step for s in stats_all)


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- parts (per rank)


def part_bubble(rank, world, args):
    from torchlane.parallel import pipeline
    from torchlane.parallel.pipeline import bubble_fraction_formula

    rows, timeline = [], None
    for schedule in ("gpipe", "1f1b"):
        for m in (4, 8, 16):
            torch.manual_seed(0)
            layers = [SleepLayer(args.t_f) for _ in range(world)]
            pipe = pipeline(layers, dist.group.WORLD, n_microbatches=m, schedule=schedule)
            x = torch.randn(m * 2, 16)
            loss_fn = lambda out, y: out.pow(2).mean()  # noqa: E731
            vals = []
            for _ in range(3):
                dist.barrier()
                pipe.step(x, x, loss_fn)
                st = pipe.last_stats
                vals.append(_bubble(_gather({"step_s": st.step_s, "compute_s": st.compute_s})))
            events = _gather(pipe.last_stats.events)
            if schedule == "1f1b" and m == 8:
                timeline = events
            rows.append(
                {
                    "schedule": schedule,
                    "stages": world,
                    "microbatches": m,
                    "bubble_measured": statistics.median(vals[1:]),
                    "bubble_formula": bubble_fraction_formula(world, m),
                }
            )
    return {"rows": rows, "timeline_1f1b_m8": timeline}


def part_memory(rank, world, args):
    from gpt import lm_loss, pipeline_layers
    from torchlane.parallel import pipeline

    rows = []
    for schedule in ("gpipe", "1f1b"):
        model = _gpt(n_layer=2 * world - 2)
        pipe = pipeline(
            pipeline_layers(model), dist.group.WORLD, n_microbatches=8, schedule=schedule
        )
        x, y = _batch(256, b=16)
        pipe.step(x, y, lm_loss)
        st = pipe.last_stats
        per = _gather((st.peak_activation_bytes, st.max_in_flight))
        rows.append(
            {
                "schedule": schedule,
                "microbatches": 8,
                "peak_activation_MiB_per_stage": [round(b / 2**20, 3) for b, _ in per],
                "max_microbatches_in_flight_per_stage": [k for _, k in per],
            }
        )
    return rows


def _median_step(pipe, x, y, loss_fn, opt, steps):
    times, computes = [], []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        pipe.step(x, y, loss_fn)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = torch.tensor([time.perf_counter() - t0, pipe.last_stats.compute_s])
        tt = _gather(t)
        times.append(max(float(v[0]) for v in tt))
        computes.append(max(float(v[1]) for v in tt))
    return statistics.median(times[1:]), statistics.median(computes[1:])


def part_balance(rank, world, args):
    from gpt import lm_loss, pipeline_layers
    from torchlane.parallel import pipeline

    out = {}
    for balance in ("even", "profile"):
        model = _gpt(vocab=args.big_vocab, n_layer=4)
        pipe = pipeline(pipeline_layers(model), dist.group.WORLD, n_microbatches=4, balance=balance)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = _batch(args.big_vocab)
        step, slowest = _median_step(pipe, x, y, lm_loss, opt, args.steps)
        out[balance] = {"balance": pipe.balance, "step_s": step, "slowest_stage_compute_s": slowest}
        if balance == "profile" and rank == 0:
            out[balance]["profiled_layer_ms"] = [round(t * 1e3, 3) for t in pipe.layer_times]
    out["ratio_even_over_profile"] = out["even"]["step_s"] / out["profile"]["step_s"]
    return out


def part_dynamic(rank, world, args):
    from gpt import lm_loss, pipeline_layers
    from torchlane.parallel import pipeline

    out = {}
    for threshold in (None, 0.2):
        model = _gpt(n_layer=6)
        layers = pipeline_layers(model)
        slow_rank = world - 1
        for m in layers:  # the slowed rank: every layer it runs pays a fixed extra cost
            m.register_forward_pre_hook(
                lambda mod, a, r=slow_rank: (
                    time.sleep(args.slow_s) if dist.get_rank() == r else None
                )
            )
        pipe = pipeline(layers, dist.group.WORLD, n_microbatches=4, rebalance_threshold=threshold)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        pipe.attach_optimizer(opt)
        x, y = _batch(256)
        step, slowest = _median_step(pipe, x, y, lm_loss, opt, args.steps + 2)
        out["without" if threshold is None else "with"] = {
            "step_s": step,
            "final_balance": pipe.balance,
            "rebalances": pipe.rebalance_log,
        }
    out["ratio_without_over_with"] = out["without"]["step_s"] / out["with"]["step_s"]
    return out


def part_torch(rank, world, args):
    from gpt import lm_loss, pipeline_layers
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from torchlane.parallel import pipeline
    from torchlane.parallel.pipeline import even_balance

    rows = []
    m = 4
    for schedule, cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        # torchlane
        model = _gpt(n_layer=4)
        pipe = pipeline(
            pipeline_layers(model), dist.group.WORLD, n_microbatches=m, schedule=schedule
        )
        x, y = _batch(256)
        tl_times = []
        for _ in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            loss = pipe.step(x, y, lm_loss)
            tl_times.append(time.perf_counter() - t0)
            for p in model.parameters():
                p.grad = None
        tl_loss = loss.item()
        # torch.distributed.pipelining on the same split
        model = _gpt(n_layer=4)
        layers = pipeline_layers(model)
        sizes = even_balance(len(layers), world)
        lo = sum(sizes[:rank])
        stage_mod = nn.Sequential(*layers[lo : lo + sizes[rank]])
        stage = PipelineStage(stage_mod, rank, world, torch.device("cpu"))
        sched = cls(stage, n_microbatches=m, loss_fn=lm_loss)
        th_times, losses = [], []
        for _ in range(args.steps):
            losses = []
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                sched.step(x)
            elif rank == world - 1:
                sched.step(target=y, losses=losses)
            else:
                sched.step()
            th_times.append(time.perf_counter() - t0)
            for p in stage_mod.parameters():
                p.grad = None
        th_loss = torch.stack(losses).mean().item() if losses else 0.0
        t = _gather((statistics.median(tl_times[1:]), statistics.median(th_times[1:]), th_loss))
        rows.append(
            {
                "schedule": schedule,
                "stages": world,
                "microbatches": m,
                "torchlane_step_s": max(v[0] for v in t),
                "torch_step_s": max(v[1] for v in t),
                "ratio_torch_over_torchlane": max(v[1] for v in t) / max(v[0] for v in t),
                "torchlane_loss": tl_loss,
                "torch_loss": t[-1][2],
            }
        )
    return rows


PARTS = {
    "bubble": (part_bubble, 4),
    "memory": (part_memory, 4),
    "balance": (part_balance, 2),
    "dynamic": (part_dynamic, 2),
    "torch": (part_torch, 2),
}


# ----------------------------------------------------------------------------- launch


def _worker(rank, world, port, part, args, q):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
        res = PARTS[part][0](rank, world, args)
        dist.barrier()
        dist.destroy_process_group()
        q.put((rank, True, res))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))


def run_part(part, args):
    import torch.multiprocessing as mp

    world = PARTS[part][1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, part, args, q)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, ok, res = q.get(timeout=600)
            if not ok:
                raise RuntimeError(f"part {part}, rank {rank} failed:\n{res}")
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results[0]


def plot_timeline(events, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"F": "tab:blue", "B": "tab:green", "recv": "lightgrey"}
    fig, ax = plt.subplots(figsize=(10, 2.6))
    t0 = min(e[2] for ev in events for e in ev)
    for stage, ev in enumerate(events):
        for kind, i, a, b in ev:
            ax.barh(
                stage,
                (b - a) * 1e3,
                left=(a - t0) * 1e3,
                color=colors[kind],
                edgecolor="k",
                linewidth=0.3,
            )
            if kind in ("F", "B"):
                ax.text(
                    (a + b - 2 * t0) / 2 * 1e3,
                    stage,
                    f"{kind}{i}",
                    ha="center",
                    va="center",
                    fontsize=6,
                )
    ax.set_yticks(range(len(events)), [f"stage {s}" for s in range(len(events))])
    ax.invert_yaxis()
    ax.set_xlabel(
        "ms from the step's start (blue: forward, green: backward, grey: waiting on recv)"
    )
    ax.set_title("torchlane 1F1B, 4 stages, 8 micro-batches (sleep layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--t-f", type=float, default=0.01, help="sleep layers' forward seconds")
    p.add_argument("--big-vocab", type=int, default=8192, help="uneven model's vocabulary")
    p.add_argument("--slow-s", type=float, default=0.004, help="per-layer delay of the slowed rank")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", default=str(HERE / "results" / "pipeline.json"))
    args = p.parse_args(argv)
    out = {
        "machine": "shared 2-core CPU box, other jobs running: timings are rough",
        "torch": torch.__version__,
    }
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        res = run_part(part, args)
        if part == "bubble":
            plot_timeline(
                res.pop("timeline_1f1b_m8"), Path(args.json).with_name("pipeline_timeline.png")
            )
        out[part] = res
        print(
            f"== {part} ({time.perf_counter() - t0:.0f} s)\n{json.dumps(res, indent=1)}", flush=True
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
