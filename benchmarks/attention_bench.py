"""torchlane.attention vs torch's scaled_dot_product_attention: GFLOP/s against sequence length.

    python benchmarks/attention_bench.py                       # CPU, fp32, causal, fwd and fwd+bwd
    python benchmarks/attention_bench.py --device cuda --dtype bf16 --seq 512,1024,2048,4096

Both run on the same inputs in the same process, in alternating rounds (order rotated each
round, first round warm-up); the figure is the median time. FLOPs are counted as usual for
attention: forward 4 B H S^2 D (two matmuls), halved when causal; forward + backward 3.5x the
forward (the backward does 2.5x the forward's matmul work).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "python")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seq", default="128,256,512,1024,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="calls per backend per round")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--json", default=str(HERE / "results" / "attention_seq.json"))
    args = p.parse_args(argv)
    args.seqs = [int(s) for s in args.seq.split(",") if s]
    return args


def flops_forward(b, h, s, d, causal):
    f = 4.0 * b * h * s * s * d
    return f / 2 if causal else f


def backends(causal):
    import torch.nn.functional as F

    out = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    try:
        import torchlane

        if hasattr(torchlane, "attention"):
            out["torchlane"] = lambda q, k, v: torchlane.attention(q, k, v, causal=causal)
    except ImportError:
        pass
    return out


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, reps):
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    causal = not args.no_causal
    fns = backends(causal)
    if "torchlane" not in fns:
        print(
            "[attention_bench] torchlane.attention is not available in this build: SDPA only",
            flush=True,
        )
    rows = []
    for s in args.seqs:
        g = torch.Generator().manual_seed(s)
        shape = (args.batch, args.heads, s, args.head_dim)
        q, k, v = (
            torch.randn(shape, generator=g).to(args.device, dtype).requires_grad_()
            for _ in range(3)
        )
        grad = torch.randn(shape, generator=g).to(args.device, dtype)
        times = {(name, mode): [] for name in fns for mode in ("fwd", "fwd_bwd")}
        names = list(fns)
        for r in range(args.rounds + 1):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn = fns[name]

                def fwd(fn=fn, qkv=(q, k, v)):
                    with torch.no_grad():
                        fn(*qkv)

                def fwd_bwd(fn=fn, qkv=(q, k, v), grad=grad):
                    torch.autograd.grad(fn(*qkv), qkv, grad)

                for mode, call in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                    t = time_call(call, args.device, args.reps)
                    if r > 0:
                        times[(name, mode)].extend(t)
        f = flops_forward(args.batch, args.heads, s, args.head_dim, causal)
        row = {"seq": s}
        for (name, mode), t in times.items():
            med = statistics.median(t)
            row[f"{name}_{mode}_ms"] = med * 1e3
            row[f"{name}_{mode}_gflops"] = (f if mode == "fwd" else 3.5 * f) / med / 1e9
        for mode in ("fwd", "fwd_bwd"):
            if f"torchlane_{mode}_ms" in row:
                row[f"speedup_{mode}"] = row[f"sdpa_{mode}_ms"] / row[f"torchlane_{mode}_ms"]
        rows.append(row)
        print(
            f"S={s:5d}  "
            + "  ".join(
                f"{n} {m}: {row[f'{n}_{m}_gflops']:6.2f} GFLOP/s"
                for n in fns
                for m in ("fwd", "fwd_bwd")
            ),
            flush=True,
        )
    result = {
        "benchmark": "attention",
        "command": "python " + " ".join(["benchmarks/attention_bench.py"] + sys.argv[1:]),
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "causal": causal,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "rounds": args.rounds,
        "reps": args.reps,
        "backends": list(fns),
        "results": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"[attention_bench] wrote {args.json}")


if __name__ == "__main__":
    main()
