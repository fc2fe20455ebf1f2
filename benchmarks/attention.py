"""torchlane.attention vs torch SDPA (PyTorch's CPU flash kernel) vs the math composition.

    python benchmarks/attention.py --rounds 1         # the README table (~13 min on 2 cores)
    python benchmarks/attention.py --seqs 1024 --dims 64 --dtypes bf16   # one configuration
    python benchmarks/attention.py --device cuda --dtypes bf16 --seqs 512 1024 2048 4096

`make bench` (benchmarks/run_all.py, part "attention") runs the sequence sweep
    python benchmarks/attention.py --seqs 128 256 512 1024 2048 --dims 64 --dtypes fp32 \\
        --causal yes --batch 1 --heads 4 --threads 1 --rounds 5 --stat median --memory-seq 0 \\
        --no-math --out benchmarks/results/attention_seq.json

torchlane, SDPA, math and a --matmul-size^3 matmul in the same dtype (and one in fp32 for other
dtypes) are run alternately,
--rounds times per configuration (after one warm-up call each when S < 2048); each round times up
to 5 calls of each (stopping after 0.2 s) and --stat keeps the best (default) or the median of
all of them. On cuda, inputs live on the GPU and every timed call is bracketed by
torch.cuda.synchronize().

Prints, per configuration, the time in ms, GFLOP/s (forward 4*B*H*Sq*Sk*D, halved when causal;
backward 2.5x forward) and the ratio of SDPA's time to torchlane's (> 1: torchlane is faster),
and torchlane's GFLOP/s as a fraction of the fp32 matmul's (tl/mm32, the rate the issue's target
refers to) and of the same-dtype matmul's (tl/mm). Then the
peak extra memory of one forward and one forward+backward at S=8192 (B=1, H=4, D=64), each
implementation in a fresh process (CPU: resident set growth; cuda: CUDA allocator peak growth).
Writes benchmarks/results/attention.json (--out).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import torchlane  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATS = {"best": min, "median": statistics.median}
# Skip the math path when its fp32 score matrix alone exceeds this.
MATH_MAX_SCORE_BYTES = 256 << 20
# (B, H, D) of the peak-memory measurement: B=1, H=4 keeps one S=8192 forward+backward under a
# minute on 2 cores; the O(S^2) vs O(S) contrast does not depend on B or H.
MEMORY_SHAPE = (1, 4, 64)


def math_attention(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        n = s.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return s.softmax(-1) @ v


IMPLS = {
    "torchlane": lambda q, k, v, c: torchlane.attention(q, k, v, causal=c),
    "sdpa": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
    "math": math_attention,
}


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, min_time=0.2, max_iters=5):
    """Times of up to max_iters calls, stopping after min_time seconds (at least one call)."""
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (not times or time.perf_counter() - start < min_time):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def make_inputs(B, H, S, D, dtype, grad, device):
    """q, k, v (requiring grad when `grad`) and an output gradient, on `device`."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, S, D, generator=g).to(device, dtype) for _ in range(4))
    return [t.requires_grad_(grad) for t in (q, k, v)], do


def make_step(impl, q, k, v, do, causal, backward):
    f = IMPLS[impl]
    if not backward:

        def fwd():
            with torch.no_grad():
                f(q, k, v, causal)

        return fwd

    def fwd_bwd():
        out = f(q, k, v, causal)
        torch.autograd.grad(out, (q, k, v), do)

    return fwd_bwd


def bench_config(impls, S, D, dtype, causal, backward, a):
    """Time of each implementation (and, if a.matmul_size, of an a.matmul_size^3 matmul in
    `dtype`, as "matmul"): a.stat over all calls of a.rounds rounds, interleaved round by round so
    that load from other processes on the machine hits all of them alike."""
    (q, k, v), do = make_inputs(a.batch, a.heads, S, D, dtype, backward, a.device)
    steps = {i: make_step(i, q, k, v, do, causal, backward) for i in impls}
    if a.matmul_size:
        x = torch.randn(a.matmul_size, a.matmul_size).to(a.device, dtype)
        steps["matmul"] = lambda: x @ x
        if dtype != torch.float32:  # the issue's reference rate is fp32's
            x32 = x.float()
            steps["matmul_fp32"] = lambda: x32 @ x32
    if S < 2048:  # longer calls are timed cold: a warm-up would double the run time
        for step in steps.values():
            step()
        synchronize(a.device)
    times = {i: [] for i in steps}
    for _ in range(a.rounds):
        for i, step in steps.items():
            times[i] += timeit(step, a.device)
    return {i: STATS[a.stat](t) for i, t in times.items()}


def _rss_kib():
    with open("/proc/self/status") as f:  # Linux
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def peak_memory_child(impl, S, dtype_name, backward, device):
    """Run in a fresh process: print the peak memory during one call minus the memory before it,
    in MiB. CPU: the resident set, sampled every millisecond by a thread; cuda: the CUDA caching
    allocator's peak."""
    B, H, D = MEMORY_SHAPE
    (q, k, v), do = make_inputs(B, H, S, D, DTYPES[dtype_name], backward, device)

    def call():
        out = IMPLS[impl](q, k, v, False)
        if backward:
            torch.autograd.grad(out, (q, k, v), do)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    base = _rss_kib()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    call()
    done.set()
    sampler.join()
    print((max(peak[0], _rss_kib()) - base) / 1024)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per configuration")
    p.add_argument(
        "--stat", choices=list(STATS), default="best", help="time kept of all timed calls"
    )
    p.add_argument(
        "--matmul-size", type=int, default=2048, help="reference matmul size; 0 skips it"
    )
    p.add_argument("--memory-seq", type=int, default=8192, help="0 skips the memory measurement")
    p.add_argument("--no-math", action="store_true")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.json")
    )
    p.add_argument("--_peak", nargs=4, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a._peak:
        impl, S, dt, bwd = a._peak
        peak_memory_child(impl, int(S), dt, bwd == "1", a.device)
        return

    causals = {"both": [False, True], "yes": [True], "no": [False]}[a.causal]
    print(
        f"torch {torch.__version__}, {a.device}, {a.threads} threads, B={a.batch} H={a.heads}, "
        f"{a.stat} of {a.rounds} rounds; tl/mm32, tl/mm: torchlane GFLOP/s over that of a "
        f"{a.matmul_size}^3 matmul in fp32 / in the same dtype, same rounds"
    )
    hdr = f"{'dtype':5} {'S':>5} {'D':>4} {'causal':6} {'pass':7} | {'torchlane ms':>12} {'sdpa ms':>9} {'math ms':>9} | {'tl GF/s':>8} {'sdpa GF/s':>9} | {'sdpa/tl':>7} {'tl/mm32':>7} {'tl/mm':>6}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    B, H = a.batch, a.heads
    for dt in a.dtypes:
        for S in a.seqs:
            for D in a.dims:
                for causal in causals:
                    for backward in (False, True):
                        flops = (
                            4 * B * H * S * S * D / (2 if causal else 1) * (3.5 if backward else 1)
                        )
                        big = B * H * S * S * 4 > MATH_MAX_SCORE_BYTES
                        impls = ["torchlane", "sdpa"] + ([] if a.no_math or big else ["math"])
                        t = bench_config(impls, S, D, DTYPES[dt], causal, backward, a)
                        mm = t.pop("matmul", None)
                        mm32 = t.pop("matmul_fp32", mm)
                        mm_gf = 2 * a.matmul_size**3 / mm / 1e9 if mm else None
                        mm32_gf = 2 * a.matmul_size**3 / mm32 / 1e9 if mm32 else None
                        gf = {k: flops / v / 1e9 for k, v in t.items()}
                        row = dict(
                            dtype=dt,
                            S=S,
                            D=D,
                            causal=causal,
                            backward=backward,
                            ms={k: v * 1e3 for k, v in t.items()},
                            gflops=gf,
                            ratio_sdpa=t["sdpa"] / t["torchlane"],
                            matmul_gflops=mm_gf,
                            frac_matmul=gf["torchlane"] / mm_gf if mm_gf else None,
                            matmul_fp32_gflops=mm32_gf,
                            frac_matmul_fp32=gf["torchlane"] / mm32_gf if mm32_gf else None,
                        )
                        rows.append(row)
                        print(
                            f"{dt:5} {S:5d} {D:4d} {str(causal):6} {'fwd+bwd' if backward else 'fwd':7} | "
                            f"{t['torchlane'] * 1e3:12.1f} {t['sdpa'] * 1e3:9.1f} {t.get('math', math.nan) * 1e3:9.1f} | "
                            f"{gf['torchlane']:8.1f} {gf['sdpa']:9.1f} | {row['ratio_sdpa']:7.2f} "
                            f"{row['frac_matmul_fp32'] or math.nan:7.2f} "
                            f"{row['frac_matmul'] or math.nan:6.2f}",
                            flush=True,
                        )
    memory = {}
    if a.memory_seq:
        S = a.memory_seq
        what = "CUDA allocator peak growth" if a.device == "cuda" else "max RSS growth"
        print(
            f"\npeak extra memory ({what}, MiB) of one call at B, H, D = {MEMORY_SHAPE}, S={S}, "
            "fp32, non-causal:"
        )
        for impl in ("torchlane", "sdpa"):
            for bwd in ("0", "1"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(a.threads),
                    "--device",
                    a.device,
                    "--_peak",
                    impl,
                    str(S),
                    "fp32",
                    bwd,
                ]
                mib = float(
                    subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[
                        -1
                    ]
                )
                memory[f"{impl} {'fwd+bwd' if bwd == '1' else 'fwd'}"] = mib
                print(f"  {impl:10} {'fwd+bwd' if bwd == '1' else 'fwd':8} {mib:8.0f} MiB")
        print(
            f"  (math would need {MEMORY_SHAPE[0] * MEMORY_SHAPE[1] * S * S * 4 / 2**30:.1f} GiB for the fp32 score matrix alone)"
        )
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(
            {
                "benchmark": "attention",
                "command": " ".join(["python", "benchmarks/attention.py", *argv]),
                "torch": torch.__version__,
                "device": a.device,
                "threads": a.threads,
                "batch": B,
                "heads": H,
                "rounds": a.rounds,
                "stat": a.stat,
                "rows": rows,
                "peak_extra_mib_S": a.memory_seq,
                "peak_extra_mib": memory,
            },
            f,
            indent=1,
        )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
