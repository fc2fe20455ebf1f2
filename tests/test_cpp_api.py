"""The C++ API (csrc/api/, docs/cpp_api.md): tests/cpp/test_ddp.cpp built with CMake as a user's
project, find_package(torchlane) from torchlane.cmake_prefix_path (the CMake package the Python
build ships), so it links the libtorchlane.so that torchlane._C links; run on 2 and 3 ranks, compared
with the one-process replica and with python/torchlane/ddp.py on the same model and data
(tests/cpp_api_cases.py). Also: one copy of the core per process (Note [One copy of the core] in
setup.py)."""

import ast
import os
import shutil
import subprocess
import sys

import dist
import pytest
import torchlane
from cpp_api_cases import (
    HIDDEN,
    STEPS,
    Net,
    checkpoint_case,
    init_params,
    losses_case,
    mismatch_case,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "cpp-api-test")
WORLD = 2
LIB = os.path.join(os.path.dirname(torchlane.__file__), "lib", "libtorchlane.so")


def _skip_reason():
    if shutil.which("cmake") is None:
        return "cmake is not installed (apt-get install cmake)"
    if not any(
        os.path.exists(os.path.join(d, "gloo", "config.h"))
        for d in ("/usr/include", "/usr/local/include")
    ):
        return "no Gloo headers for init_process_group (make cpp-deps: apt-get install libgloo-dev)"
    return None


def _sanitized(path):
    """Whether `path` links the AddressSanitizer runtime (`make sanitize` runs this file against
    the sanitized libtorchlane.so staged by tools/run_sanitized.sh)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return "libasan" in out


SANITIZED = _sanitized(LIB)


@pytest.fixture(scope="module")
def program():
    return _build("tests/cpp", BUILD, "torchlane_api_test")


@pytest.fixture(scope="module")
def example():
    """examples/cpp/train_mlp.cpp, built as `make cpp-demo` builds it."""
    return _build("examples/cpp", os.path.join(ROOT, "build", "cpp-demo-test"), "train_mlp")


def _build(source, build, target):
    """Configures (once) and builds `target` of the CMake project `source` against the torch and
    torchlane packages; returns the executable."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    import torch

    env = dict(os.environ, CCACHE_BASEDIR=os.path.dirname(ROOT), CCACHE_NOHASHDIR="1")
    env.pop("LD_PRELOAD", None)  # the sanitizer runtimes are for the tests' processes, not cmake
    prefix = f"{torch.utils.cmake_prefix_path};{torchlane.cmake_prefix_path}"
    build = build + "-sanitize" if SANITIZED else build
    configure = [
        "cmake",
        "-S",
        os.path.join(ROOT, source),
        "-B",
        build,
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_PREFIX_PATH={prefix}",
        f"-Dtorchlane_DIR={os.path.join(torchlane.cmake_prefix_path, 'torchlane')}",
    ]
    if SANITIZED:  # the test program instrumented too, as the library it links
        flags = "-fsanitize=address,undefined -fno-omit-frame-pointer -g"
        configure += [f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_EXE_LINKER_FLAGS={flags}"]
    if shutil.which("ccache"):
        configure.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
    # Incremental: the build directory is kept under build/ between runs (configured again when
    # the torch or torchlane package moved).
    cache = os.path.join(build, "CMakeCache.txt")
    if not os.path.exists(cache) or prefix not in open(cache).read():
        subprocess.run(configure, check=True, env=env, capture_output=True)
    jobs = os.environ.get("MAX_JOBS", "2")
    subprocess.run(
        ["cmake", "--build", build, "-j", jobs, "--target", target],
        check=True,
        env=env,
        capture_output=True,
    )
    path = os.path.join(build, target)
    assert _sanitized(path) == SANITIZED, path
    return path


def _ldd_torchlane(path):
    """Where the dynamic loader finds libtorchlane.so for `path` (None: not linked)."""
    out = subprocess.run(["ldd", path], check=True, capture_output=True, text=True).stdout
    found = [line.split("=>")[1].split()[0] for line in out.splitlines() if "libtorchlane" in line]
    assert len(found) <= 1, out
    return os.path.realpath(found[0]) if found else None


def test_python_extension_links_the_core_library():
    assert os.path.exists(LIB)
    assert _ldd_torchlane(torchlane._C.__file__) == os.path.realpath(LIB)
    # _C holds only the bindings: the core's code is not compiled into it a second time.
    symbols = subprocess.run(
        ["nm", "-C", "--defined-only", torchlane._C.__file__],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "torchlane::Reducer::Reducer(" not in symbols
    core = subprocess.run(
        ["nm", "-C", "-D", "--defined-only", LIB], check=True, capture_output=True, text=True
    ).stdout
    assert "torchlane::Reducer::Reducer(" in core
    assert "torchlane::DistributedDataParallel::" in core  # the C++ API (csrc/api/) is in it


ONE_PROCESS = r"""
import ctypes, os, sys, torch, torchlane
def mapped():
    with open("/proc/self/maps") as f:
        return sorted({l.split()[-1] for l in f if l.rstrip().endswith(".so") and "torchlane" in l})
print("MAPS", mapped())
# Loading the C++ API's library again (as a C++ program's dependency would be) finds the loaded one.
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
print("MAPS", mapped())
op = torch.ops.torchlane.attention_fwd.default
print("DUMP", "|".join(torch._C._dispatch_dump(op.name()).splitlines()))
"""


def test_one_core_library_per_process():
    out = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, LIB],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    ).stdout
    maps = [ast.literal_eval(line[5:]) for line in out.splitlines() if line.startswith("MAPS ")]
    ext = os.path.realpath(torchlane._C.__file__)
    for libs in maps:
        assert sorted(map(os.path.realpath, libs)) == sorted([ext, os.path.realpath(LIB)]), out
    (dump,) = [line for line in out.splitlines() if line.startswith("DUMP ")]
    # The schema and the CPU kernel each registered once (a second TORCH_LIBRARY(torchlane) would
    # have failed the import).
    assert dump.count("registered at") >= 2, dump
    assert dump.count("CPU: registered at") == 1, dump


def test_cpp_program_links_the_python_packages_library(program):
    assert _ldd_torchlane(program) == os.path.realpath(LIB)
    assert _ldd_torchlane(torchlane._C.__file__) == os.path.realpath(LIB)


def run_cpp(program, case, tmp_path, world=WORLD, may_die=(), args=()):
    """Runs one case on `world` ranks; returns per rank ({key: value}, other stdout lines).
    Ranks in may_die may end by a signal (their results are whatever they printed)."""
    store = str(tmp_path / f"store-{case.replace(':', '-')}-{len(os.listdir(tmp_path))}")
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                [program, case, store, *map(str, args)],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=120)
            rank = len(out)
            ok = p.returncode == 0 or (rank in may_die and p.returncode < 0)
            assert ok, f"{case}: rank {rank} exited with {p.returncode}: {stderr}"
            results, lines = {}, []
            for line in stdout.splitlines():
                if line.startswith("RESULT "):
                    _, key, value = line.split()
                    results[key] = float(value)
                else:
                    lines.append(line)
            out.append((results, lines))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["replica", "bucket_view", "no_sync", "unused"])
def test_matches_one_process_replica(program, case, world, tmp_path):
    out = run_cpp(program, case, tmp_path, world=world)
    assert len(out) == world
    for rank, (r, _) in enumerate(out):
        assert r["init_diff"] == 0.0, f"rank {rank}: parameters were not broadcast from rank 0"
        assert r["replica_diff"] <= 1e-6, (rank, r)
        assert r["rank0_diff"] == 0.0, (rank, r)
        assert r["num_buckets"] > 1


@pytest.mark.parametrize("world", [2, 3])
def test_losses_match_python_ddp(program, world, tmp_path):
    (cpp, _), *_ = run_cpp(program, "replica", tmp_path, world=world)
    cpp_losses = [cpp[f"loss{s}"] for s in range(STEPS)]
    py_losses = dist.run(losses_case, world)[0]
    assert cpp_losses == pytest.approx(py_losses, rel=1e-6, abs=0)
    assert cpp_losses[-1] < cpp_losses[0]


# (tolerance to the uncompressed replica or None, bytes_sent / bytes_reduced at most)
HOOKS = {"bf16": (2e-2, 0.5), "fp16": (2e-3, 0.5), "powersgd": (None, 0.9), "topk": (None, 0.9)}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_comm_hooks(program, hook, world, tmp_path):
    tol, ratio = HOOKS[hook]
    for rank, (r, _) in enumerate(run_cpp(program, f"hook:{hook}", tmp_path, world=world)):
        assert r["rank0_diff"] == 0.0, (rank, r)  # the hook's result is the same on every rank
        assert 0 < r["bytes_sent"] <= ratio * r["bytes_reduced"], (rank, r)  # it compressed
        if tol is not None:
            assert r["replica_diff"] <= tol, (rank, r)


def test_dead_peer_raises_an_exception_naming_the_bucket(program, tmp_path):
    # As tests/test_peer_failure.py for the Python class: rank 1 is SIGKILLed mid-backward;
    # rank 0 gets a C++ exception (exit code 0 after printing it, not an abort) within seconds,
    # and, as the Python side asserts, the message names the bucket.
    out = run_cpp(program, "dead_peer", tmp_path, may_die=(1,))
    results, lines = out[0]
    (line,) = [x for x in lines if x.startswith("PEER_ERROR ")]
    assert "bucket" in line, line
    assert results["error_after_s"] < 30, results


@pytest.mark.parametrize("world", [2, 3])
def test_mismatched_layout_raises_python_message(program, world, tmp_path):
    py_messages = dist.run(mismatch_case, world)
    cpp = run_cpp(program, "mismatch", tmp_path, world=world)
    for rank, (_, lines) in enumerate(cpp):
        (line,) = [x for x in lines if x.startswith("MISMATCH ")]
        assert py_messages[rank] is not None
        assert line[len("MISMATCH ") :] == py_messages[rank]
        assert "fc1.weight" in line


@pytest.mark.skipif(SANITIZED, reason="packaging, not memory safety: the normal build's test")
def test_wheel_ships_the_library_headers_and_cmake_package(tmp_path):
    """`pip wheel .` (in-tree, like `make build`'s objects: TORCHLANE_NATIVE=1 keeps the compile
    flags of the in-place build, so ninja has nothing to recompile and this takes seconds)."""
    import zipfile

    env = dict(os.environ, TORCHLANE_NATIVE="1")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
        + [ROOT, "-w", str(tmp_path / "dist")],
        check=True,
        env=env,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("torchlane-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    for name in [
        "torchlane/lib/libtorchlane.so",
        "torchlane/include/torchlane/torchlane.h",
        "torchlane/include/torchlane/api/ddp.h",
        "torchlane/include/torchlane/comm/comm_hook.hpp",
        "torchlane/include/torchlane/hooks/powersgd_hook.hpp",
        "torchlane/include/torchlane/reducer/reducer.hpp",
        "torchlane/share/cmake/torchlane/torchlaneConfig.cmake",
        "torchlane/share/cmake/torchlane/torchlaneConfigVersion.cmake",
    ]:
        assert name in names, name
    (ext,) = [n for n in names if n.startswith("torchlane/_C") and n.endswith(".so")]
    # Installed, _C finds the wheel's own library (RUNPATH $ORIGIN/lib).
    site = tmp_path / "site"
    assert _ldd_torchlane(str(site / ext)) == os.path.realpath(site / "torchlane/lib/libtorchlane.so")


# ---- checkpoints: the C++ API writes and reads python/torchlane/checkpoint.py's files ----


def _assert_close(cpp_model, py_params, tol=1e-6):
    assert list(cpp_model) == list(py_params)
    for name, value in py_params.items():
        diff = (cpp_model[name] - value).abs().max().item()
        assert diff <= tol, (name, diff)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_checkpoint_written_by_cpp_resumes_in_python(program, kind, tmp_path):
    """C++ trains 2 steps, saves, trains on to step 4 and saves again; Python loads the C++ step-2
    checkpoint (checksum verified by checkpoint.read) into torch.optim and trains to step 4: its
    parameters equal those of the uninterrupted C++ run's step-4 checkpoint."""
    from torchlane import checkpoint

    ckpt = tmp_path / "ckpt"
    run_cpp(program, f"ckpt:{kind}:save", tmp_path, args=[ckpt])
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt)] == [2, 4]
    cpp_final = checkpoint.read(checkpoint.checkpoint_path(ckpt, 4))
    assert cpp_final["world_size"] == WORLD and len(cpp_final["rng"]) == WORLD
    assert cpp_final["optimizer"]["param_groups"][0]["params"] == list(range(6))
    py_params, start = dist.run(
        checkpoint_case, WORLD, args=(kind, checkpoint.checkpoint_path(ckpt, 2), "resume")
    )[0]
    assert start == 2
    _assert_close(cpp_final["model"], py_params)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_checkpoint_written_by_python_resumes_in_cpp(program, kind, tmp_path):
    """Python trains 2 steps, saves (checkpoint.save) and trains on to step 4; C++ loads the
    Python checkpoint (its checksum recomputed in C++) and trains to step 4: the same parameters."""
    from torchlane import checkpoint

    ckpt = tmp_path / "ckpt"
    py_params, _ = dist.run(checkpoint_case, WORLD, args=(kind, str(ckpt), "save"))[0]
    out = run_cpp(program, f"ckpt:{kind}:load", tmp_path, args=[ckpt])
    for results, _ in out:
        assert results["loaded_step"] == 2 and results["data_position"] == 2
    cpp_final = checkpoint.read(checkpoint.checkpoint_path(ckpt, 4))
    _assert_close(cpp_final["model"], py_params)


def test_checkpoint_errors_match_python(program, tmp_path):
    import torch
    from torchlane import checkpoint

    ckpt = tmp_path / "ckpt"
    run_cpp(program, "ckpt:sgd:save", tmp_path, args=[ckpt])
    checkpoint._remove_checkpoint(checkpoint.checkpoint_path(ckpt, 4))
    good = checkpoint.checkpoint_path(ckpt, 2)
    state = torch.load(good, weights_only=True)
    state["model"]["fc2.bias"][3] += 1.0  # a flipped value; the stored checksum is now wrong
    corrupt = tmp_path / "corrupt.pt"
    torch.save(state, corrupt)
    del state["checksum"]
    state["model"]["fc2.bias"][3] -= 1.0
    state["rng"] = []
    state["checksum"] = checkpoint._digest(state)
    no_rng = tmp_path / "no-rng.pt"
    torch.save(state, no_rng)
    out = run_cpp(program, "ckpt_errors", tmp_path, args=[ckpt, corrupt, no_rng])
    for rank, (results, lines) in enumerate(out):
        errors = dict(line.split(" ", 2)[1:] for line in lines if line.startswith("CKPT_ERROR "))
        assert results["missing_ok_is_fresh_start"] == 1 and results["untouched"] == 1
        assert "does not exist" in errors["missing_dir"]
        assert "missing_ok" in errors["missing_dir"]
        assert errors["corrupt"].startswith(f"checkpoint file {corrupt} is corrupt: its content checksum is ")
        assert "torch.optim.Adam" in errors["optimizer_type"]
        assert f"holds no torch RNG state for rank {rank}" in errors["no_rng"]
        # Rank 0 refuses to write; the others learn it failed (as in checkpoint.py).
        assert ("higher steps [2]" if rank == 0 else "rank 0 failed to write") in errors["older_step"]
        # The same message as checkpoint.py's for the same file and model.
        wide = Net(HIDDEN + 1)
        init_params(wide, 0.0)
        with pytest.raises(checkpoint.CheckpointError) as py_error:
            checkpoint.load(ckpt, wide)
        assert errors["shape"] == str(py_error.value)
        with pytest.raises(checkpoint.CheckpointError) as py_error:
            checkpoint.read(corrupt)  # load adds its fallback advice, which C++ has not
        assert errors["corrupt"] == str(py_error.value)


def _digest_cases():
    import torch

    floats = [0.0, -0.0, 1.0, 0.1, 1e-05, 0.0001, 123456.789, 1e16, 1e15, 100000.0, 2.5e-300,
              1.7976931348623157e308, 5e-324, -3.25, float("inf"), float("-inf"), 1 / 3]
    return {
        "floats": floats,
        "ints": [0, -1, 2**62, -(2**62)],
        "strings": ["plain", "it's", 'say "hi"', "both ' and \"", "tab\tnew\nline\\", "\x01\x7f",
                    "ünïcødé ✓"],
        "misc": (None, True, False, [], {}, ()),
        "nested": {"a": [1, (2.5, "x")], 3: {"b": None}},
        "tensors": [torch.arange(6, dtype=dt).reshape(2, 3) for dt in
                    (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                     torch.int32, torch.int16, torch.int8, torch.uint8)]
        + [torch.tensor(3.5), torch.zeros(0), torch.tensor([True, False]), torch.ones(4)[::2],
           torch.sin(torch.arange(262147, dtype=torch.float32))],
    }


@pytest.mark.parametrize("sha", ["native", "portable"])
def test_checkpoint_digest_matches_python(program, sha, tmp_path, monkeypatch):
    """C++'s checksum of checkpoint.py's format on values of every kind it supports: Python writes
    a checkpoint-format file, C++ read_checkpoint recomputes the digest and must agree; with the
    SHA extensions where the CPU has them and with the portable rounds (Note [Checkpoint digest
    speed]); a 1 MB tensor covers the many-block path."""
    import torch
    from torchlane import checkpoint

    if sha == "portable":
        monkeypatch.setenv("TORCHLANE_PORTABLE_SHA256", "1")

    state = {"format": checkpoint.FORMAT, **_digest_cases()}
    state["checksum"] = checkpoint._digest(state)
    good = tmp_path / "good.pt"
    torch.save(state, good)
    ((_, lines),) = run_cpp(program, "read", tmp_path, world=1, args=[good])
    assert lines == [f"READ ok {len(state)}"], lines
    state["floats"] = state["floats"] + [0.30000000000000004]  # changed after the digest
    torch.save(state, good)
    ((_, lines),) = run_cpp(program, "read", tmp_path, world=1, args=[good])
    assert len(lines) == 1 and "is corrupt" in lines[0], lines


def _torchrun(example, *args):
    """The example under torchrun on 2 ranks, as `make cpp-demo` runs it; rank 0's stdout."""
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--no-python", example, *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    ).stdout
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step ")]
    (final,) = [float(x.split()[1]) for x in out.splitlines() if x.startswith("final_loss ")]
    return out, losses, final


def test_example_trains_and_resumes_exactly(example, tmp_path):
    """`make cpp-demo`'s program under torchrun: the loss falls; stopped at step 30 with a
    checkpoint directory and started again, it resumes there and ends with the uninterrupted
    run's loss, bitwise (model, momentum buffers and the data position restored)."""
    _, losses, final = _torchrun(example, 60, 64)
    assert losses[-1] < 0.5 * losses[0], losses
    ckpt = tmp_path / "ckpt"
    _torchrun(example, 30, 64, ckpt)
    out, _, resumed_final = _torchrun(example, 60, 64, ckpt)
    assert "resumed from" in out and "ckpt-0000000030.pt" in out, out
    assert resumed_final == final
