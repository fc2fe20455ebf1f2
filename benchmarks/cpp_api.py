"""C++ DDP (libtorchlane, examples/cpp/train_mlp.cpp) vs Python torchlane DDP vs torch DDP.

    python benchmarks/cpp_api.py                     # 2 ranks, hidden 256 and 1024
    python benchmarks/cpp_api.py --hidden 64,512 --steps 200

The same 3-layer MLP (32 -> hidden -> hidden -> 8, GELU), the same global batch of 256 split over
the ranks, SGD with momentum, bucket_cap_mb=1: the C++ program runs it under
torchlane::DistributedDataParallel; the Python ranks (torch.multiprocessing, Gloo on 127.0.0.1)
under torchlane.DistributedDataParallel and torch.nn.parallel.DistributedDataParallel, taking
turns. Each figure is rank 0's median step time (zero_grad, forward, loss, backward with the
all-reduces, optimizer step). The C++ front end removes the Python overhead per step; with a
small model that overhead is a visible share of the step. Also the time of one checkpoint save
of model and SGD state, both writing torchlane.checkpoint's format: the C++ program's
torchlane::save_checkpoint vs torchlane.checkpoint.save, each the first save of a 2-rank run after 5
steps (median of 5 runs). Builds the C++ program with CMake in
build/cpp-demo (examples/cpp, incremental) against the Python package's libtorchlane.so
(torchlane.cmake_prefix_path, as `make cpp-demo`). JSON: benchmarks/results/cpp_api.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests")]

IN, OUT, GLOBAL_BATCH = 32, 8, 256


def build():
    import torch
    import torchlane

    build_dir = ROOT / "build" / "cpp-demo"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT / "examples" / "cpp"),
            "-B",
            str(build_dir),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{torchlane.cmake_prefix_path}",
            f"-Dtorchlane_DIR={os.path.join(torchlane.cmake_prefix_path, 'torchlane')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        check=True,
    )
    subprocess.run(["cmake", "--build", str(build_dir), "-j", "2"], check=True)
    return build_dir / "train_mlp"


def run_cpp(program, world, steps, hidden, ckpt_dir=None):
    """Rank 0's median step ms, and with ckpt_dir the time of the final save_checkpoint."""
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            OMP_NUM_THREADS="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port_cached()),
        )
        procs.append(
            subprocess.Popen(
                [str(program), str(steps), str(hidden), *([str(ckpt_dir)] if ckpt_dir else [])],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"the C++ program failed: {outs}")
    keys = ("median_step_ms", "checkpoint_save_ms")
    values = {
        x.split()[0]: float(x.split()[1]) for x in outs[0].splitlines() if x.startswith(keys)
    }
    return values["median_step_ms"], values.get("checkpoint_save_ms")


_PORT = None


def _free_port_cached():
    global _PORT
    if _PORT is None:
        import dist

        _PORT = dist.free_port()
    return _PORT


def _mlp(hidden):
    """The C++ example's model (examples/cpp/train_mlp.cpp), seeded."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, OUT)
    )


def python_ranks(rank, world, steps, hidden):
    import torch
    import torchlane

    torch.manual_seed(0)
    x_all = torch.randn(GLOBAL_BATCH * 4, IN)
    y_all = torch.randn(GLOBAL_BATCH * 4, OUT)
    local = GLOBAL_BATCH // world
    wrappers = {
        "torchlane_py": lambda m: torchlane.DistributedDataParallel(m, bucket_cap_mb=1),
        "torch_py": lambda m: torch.nn.parallel.DistributedDataParallel(m, bucket_cap_mb=1),
    }
    times = {k: [] for k in wrappers}
    models = {}
    for k, wrap in wrappers.items():
        net = _mlp(hidden)
        models[k] = (wrap(net), torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    for rnd in range(4):  # rounds: the variants take turns
        for k, (ddp, opt) in models.items():
            for step in range(steps // 4):
                base = (step * GLOBAL_BATCH) % (GLOBAL_BATCH * 4) + rank * local
                x, y = x_all[base : base + local], y_all[base : base + local]
                t0 = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.mse_loss(ddp(x), y).backward()
                opt.step()
                if rnd > 0:
                    times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def python_first_save(rank, world, hidden, ckpt_dir):
    """What the C++ program does with a checkpoint directory and 5 steps, in Python: 5 steps
    under torchlane.DistributedDataParallel, then one torchlane.checkpoint.save (the same file
    format) of model and SGD state; returns the save's ms."""
    import torch
    import torchlane
    from torchlane import checkpoint

    net = _mlp(hidden)
    ddp = torchlane.DistributedDataParallel(net, bucket_cap_mb=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    local = GLOBAL_BATCH // world
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(torch.randn(local, IN)), torch.randn(local, OUT)).backward()
        opt.step()
    t0 = time.perf_counter()
    checkpoint.save(ckpt_dir, ddp, opt, 5)
    return (time.perf_counter() - t0) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--hidden", default="256,1024")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=str(HERE / "results" / "cpp_api.json"))
    args = p.parse_args(argv)
    import dist

    program = build()
    rows = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            cpp, _ = run_cpp(program, args.world_size, args.steps, hidden)
            # The C++ save: the final one of a short run with a checkpoint directory, 5 runs.
            cpp_saves = [
                run_cpp(program, args.world_size, 5, hidden, Path(tmp) / f"cpp{i}")[1]
                for i in range(5)
            ]
            py_saves = [
                dist.run(python_first_save, args.world_size, (hidden, Path(tmp) / f"py{i}"))[0]
                for i in range(5)
            ]
            py = dist.run(python_ranks, args.world_size, (args.steps, hidden), timeout=900)[0]
        row = {"hidden": hidden, "cpp_ms": cpp, **{f"{k}_ms": v for k, v in py.items()}}
        row["cpp_checkpoint_save_ms"] = statistics.median(cpp_saves)
        row["py_checkpoint_save_ms"] = statistics.median(py_saves)
        row["torchlane_py_over_cpp"] = py["torchlane_py"] / cpp
        row["torch_py_over_cpp"] = py["torch_py"] / cpp
        rows.append(row)
        print(
            f"hidden {hidden:5d}: C++ torchlane {cpp:7.3f} ms | Python torchlane "
            f"{py['torchlane_py']:7.3f} ms ({row['torchlane_py_over_cpp']:.2f}x) | torch DDP "
            f"{py['torch_py']:7.3f} ms ({row['torch_py_over_cpp']:.2f}x) | checkpoint save: C++ "
            f"{row['cpp_checkpoint_save_ms']:.1f} ms, Python {row['py_checkpoint_save_ms']:.1f} ms",
            flush=True,
        )
    out = {
        "world_size": args.world_size,
        "steps": args.steps,
        "global_batch": GLOBAL_BATCH,
        "note": "median step ms of rank 0; shared, noisy 2-core machine",
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
