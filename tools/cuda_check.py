"""Compile every CUDA kernel instantiation with nvcc alone and check its resources.

    python tools/cuda_check.py            # csrc/kernels/*.cu for sm_80 and sm_90
    python tools/cuda_check.py --glue     # also compile csrc/attention/*.cu against torch's headers

For each csrc/kernels/*.cu (no torch headers), one nvcc call builds sm_80 and sm_90 code with
every warning an error (nvcc, ptxas and the host compiler), and `ptxas -v` is parsed: a kernel
fails on any register spill (spill stores/loads > 0) or on static shared memory over 48 KiB.
Dynamic shared memory (the tiles) is checked at compile time by static_asserts in
flash_launch.cuh and printed here from a small host program built by nvcc (host code only, so it
runs without a GPU). Nothing is executed on a GPU. Exit status 0 when everything passes.
"""

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ["80", "90"]
STATIC_SMEM_LIMIT = 48 * 1024
DYNAMIC_SMEM_LIMIT = {"80": 163 * 1024, "90": 227 * 1024}

SMEM_PROBE = r"""
#include <cstdio>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "kernels/tile_common.h"
using namespace torchlane::kernels;
template <int D, typename E> void row(const char* name) {
  std::printf("%s %d %d %d\n", name, D, FwdTraits<D, E>::kFwdSmemBytes, BwdTraits<D, E>::kBwdSmemBytes);
}
int main() {
  row<64, __half>("fp16"); row<128, __half>("fp16");
  row<64, __nv_bfloat16>("bf16"); row<128, __nv_bfloat16>("bf16");
}
"""


def nvcc():
    path = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None)
    if not path or not os.path.exists(path):
        sys.exit("cuda_check: nvcc not found (put it on PATH or set CUDA_HOME)")
    return path


def base_flags():
    flags = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-I{os.path.join(ROOT, 'csrc')}", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
    for a in ARCHS:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def compile_one(src, outdir, extra=()):
    obj = os.path.join(outdir, os.path.basename(src) + ".o")
    cmd = [nvcc(), *base_flags(), "-Xptxas", "-v", *extra, "-c", src, "-o", obj]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    return src, r.returncode, r.stdout + r.stderr, time.perf_counter() - t0


def parse_ptxas(log):
    """[(kernel, arch, registers, spill_stores, spill_loads, static_smem)]"""
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "regs": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill_st"], cur["spill_ld"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return out


def demangle(name):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    return subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip()


def smem_table(outdir):
    src = os.path.join(outdir, "smem_probe.cu")
    with open(src, "w") as f:
        f.write(SMEM_PROBE)
    exe = os.path.join(outdir, "smem_probe")
    r = subprocess.run([nvcc(), "-std=c++20", f"-I{os.path.join(ROOT, 'csrc')}", src, "-o", exe], capture_output=True, text=True)
    if r.returncode != 0:
        return False, "smem probe failed to build:\n" + r.stdout + r.stderr
    lines = subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split("\n")
    ok, report = True, ["dynamic shared memory (bytes): dtype D forward backward"]
    for line in filter(None, lines):
        name, d, fwd, bwd = line.split()
        worst = max(int(fwd), int(bwd))
        bad = [a for a in ARCHS if worst > DYNAMIC_SMEM_LIMIT[a]]
        ok &= not bad
        report.append(f"  {name} {d:>4} {fwd:>8} {bwd:>8}" + (f"  OVER the limit of sm_{bad}" if bad else ""))
    return ok, "\n".join(report)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--glue", action="store_true", help="also compile csrc/attention/*.cu (needs torch's headers; slow)")
    p.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    a = p.parse_args()
    t0 = time.perf_counter()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
    if not sources:
        sys.exit("cuda_check: no csrc/kernels/*.cu found")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(s, ()) for s in sources]
        if a.glue:
            import torch.utils.cpp_extension as ext

            inc = [f"-I{d}" for d in ext.include_paths()]
            py = subprocess.run([sys.executable, "-c", "import sysconfig;print(sysconfig.get_paths()['include'])"], capture_output=True, text=True).stdout.strip()
            glue_flags = (*inc, f"-I{py}", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1")
            jobs += [(s, glue_flags) for s in sorted(glob.glob(os.path.join(ROOT, "csrc", "attention", "*.cu")))]
        with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
            results = list(pool.map(lambda j: compile_one(j[0], tmp, j[1]), jobs))
        print(f"{'kernel':70} {'arch':>5} {'regs':>5} {'spill':>6} {'smem':>6}")
        for src, rc, log, secs in results:
            rel = os.path.relpath(src, ROOT)
            if rc != 0:
                failures.append(f"{rel}: nvcc failed ({rc})\n{log}")
                continue
            for k in parse_ptxas(log):
                spills = k["spill_st"] + k["spill_ld"]
                name = demangle(k["kernel"])
                name = re.sub(r"torchlane::kernels::", "", name)
                print(f"{name[:70]:70} {'sm_' + k['arch']:>5} {k['regs']:5d} {spills:6d} {k['smem']:6d}")
                if spills:
                    failures.append(f"{rel}: {name} spills {spills} bytes on sm_{k['arch']}")
                if k["smem"] > STATIC_SMEM_LIMIT:
                    failures.append(f"{rel}: {name} uses {k['smem']} bytes of static shared memory")
            print(f"  ({rel}: {secs:.0f} s)")
        ok, table = smem_table(tmp)
        print(table)
        if not ok:
            failures.append("dynamic shared memory over the limit")
    print(f"cuda_check: {len(sources)} kernel files{' + glue' if a.glue else ''}, sm_{'/sm_'.join(ARCHS)}, {time.perf_counter() - t0:.0f} s")
    if failures:
        print("FAILED:\n" + "\n".join(failures))
        sys.exit(1)
    print("cuda_check: OK (compiled only; nothing was executed on a GPU)")


if __name__ == "__main__":
    main()
