"""torchlane.attention vs torch SDPA (PyTorch's CPU flash kernel) vs the math composition.

    python benchmarks/attention.py                    # the README table (takes ~15 min on 2 cores)
    python benchmarks/attention.py --seqs 1024 --dims 64 --dtypes bf16   # one configuration

Prints, per configuration, the time in ms, GFLOP/s (forward 4*B*H*Sq*Sk*D, halved when causal;
backward 2.5x forward) and the ratio of SDPA's time to torchlane's (> 1: torchlane is faster),
and the forward GFLOP/s as a fraction of an fp32/bf16 matmul measured in the same run. Then the
peak extra memory of one forward+backward at S=8192, each implementation in a fresh process.
Writes benchmarks/results/attention.json.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import torchlane  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATH_MAX_SCORE_BYTES = 2 << 30  # skip the math path when its score matrix alone exceeds this


def math_attention(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


IMPLS = {
    "torchlane": lambda q, k, v, c: torchlane.attention(q, k, v, causal=c),
    "sdpa": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
    "math": math_attention,
}


def timeit(fn, min_time=0.5, max_iters=20):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_time or len(times) < 2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_inputs(B, H, S, D, dtype, grad):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def bench_one(impl, B, H, S, D, dtype, causal, backward):
    q, k, v = make_inputs(B, H, S, D, dtype, backward)
    f = IMPLS[impl]
    if not backward:
        with torch.no_grad():
            return timeit(lambda: f(q, k, v, causal))
    do = torch.randn(B, H, S, D).to(dtype)

    def step():
        out = f(q, k, v, causal)
        torch.autograd.grad(out, (q, k, v), do)

    return timeit(step)


def matmul_gflops(dtype, n=2048):
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return 2 * n**3 / timeit(lambda: a @ b) / 1e9


def peak_memory_child(impl, S, dtype_name, backward):
    """Run in a fresh process: print the peak RSS growth (MiB) of one call."""
    B, H, D = 4, 8, 64
    q, k, v = make_inputs(B, H, S, D, DTYPES[dtype_name], backward)
    do = torch.randn(B, H, S, D).to(q.dtype)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = IMPLS[impl](q, k, v, False)
    if backward:
        torch.autograd.grad(out, (q, k, v), do)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) / 1024)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-seq", type=int, default=8192, help="0 skips the memory measurement")
    p.add_argument("--no-math", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.json"))
    p.add_argument("--_peak", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a._peak:
        impl, S, dt, bwd = a._peak
        peak_memory_child(impl, int(S), dt, bwd == "1")
        return

    causals = {"both": [False, True], "yes": [True], "no": [False]}[a.causal]
    mm = {name: matmul_gflops(DTYPES[name]) for name in a.dtypes}
    print(f"torch {torch.__version__}, {a.threads} threads, B={a.batch} H={a.heads}; matmul GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in mm.items()))
    hdr = f"{'dtype':5} {'S':>5} {'D':>4} {'causal':6} {'pass':7} | {'torchlane ms':>12} {'sdpa ms':>9} {'math ms':>9} | {'tl GF/s':>8} {'sdpa GF/s':>9} | {'sdpa/tl':>7} {'tl/matmul':>9}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    B, H = a.batch, a.heads
    for dt in a.dtypes:
        for S in a.seqs:
            for D in a.dims:
                for causal in causals:
                    for backward in (False, True):
                        flops = 4 * B * H * S * S * D / (2 if causal else 1) * (3.5 if backward else 1)
                        t = {}
                        for impl in IMPLS:
                            big = B * H * S * S * 4 > MATH_MAX_SCORE_BYTES
                            if impl == "math" and (a.no_math or big):
                                t[impl] = math.nan
                                continue
                            t[impl] = bench_one(impl, B, H, S, D, DTYPES[dt], causal, backward)
                        gf = {k: flops / v / 1e9 for k, v in t.items()}
                        row = dict(dtype=dt, S=S, D=D, causal=causal, backward=backward,
                                   ms={k: v * 1e3 for k, v in t.items()}, gflops=gf,
                                   ratio_sdpa=t["sdpa"] / t["torchlane"],
                                   frac_matmul=gf["torchlane"] / mm[dt])
                        rows.append(row)
                        print(f"{dt:5} {S:5d} {D:4d} {str(causal):6} {'fwd+bwd' if backward else 'fwd':7} | "
                              f"{t['torchlane'] * 1e3:12.1f} {t['sdpa'] * 1e3:9.1f} {t['math'] * 1e3:9.1f} | "
                              f"{gf['torchlane']:8.1f} {gf['sdpa']:9.1f} | {row['ratio_sdpa']:7.2f} {row['frac_matmul']:9.2f}",
                              flush=True)
    memory = {}
    if a.memory_seq:
        S = a.memory_seq
        print(f"\npeak extra memory (max RSS growth, MiB) of one call at B=4 H=8 S={S} D=64 fp32, non-causal:")
        for impl in ("torchlane", "sdpa"):
            for bwd in ("0", "1"):
                cmd = [sys.executable, __file__, "--threads", str(a.threads), "--_peak", impl, str(S), "fp32", bwd]
                mib = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
                memory[f"{impl} {'fwd+bwd' if bwd == '1' else 'fwd'}"] = mib
                print(f"  {impl:10} {'fwd+bwd' if bwd == '1' else 'fwd':8} {mib:8.0f} MiB")
        print(f"  (math would need {4 * 8 * S * S * 4 / 2**30:.0f} GiB for the fp32 score matrix alone)")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": a.threads, "matmul_gflops": mm,
                   "rows": rows, "peak_extra_mib_S": a.memory_seq, "peak_extra_mib": memory}, f, indent=1)


if __name__ == "__main__":
    main()
