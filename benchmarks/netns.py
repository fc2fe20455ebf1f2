"""Run benchmark ranks over a bandwidth-shaped link: a fresh network namespace whose loopback is
shaped with a tc token-bucket filter (tbf), a stand-in for a cluster link.

    with shaped_namespace(200) as ns:                 # 200 Mbit/s
        subprocess.run(netns_command(ns, [sys.executable, "-m", "torch.distributed.run", ...]))

    python benchmarks/netns.py --mbit 200 --check     # measure what a TCP stream gets through it

Note [Shaped loopback is a shared medium]
All ranks live in one namespace and talk over its loopback, so every byte any rank sends goes
through the same tbf queue: the link is *shared* by all ranks and both directions (N ranks doing
a ring all-reduce of S bytes put 2 (N - 1) S bytes through it), unlike a switched cluster where
each rank has its own full-duplex link. benchmarks/scale_model.py models exactly this when it is
validated against these measurements, and a per-rank link when it extrapolates.

Only the namespace created here carries traffic; it is deleted on exit (also on error or
Ctrl-C). Needs root (CAP_NET_ADMIN) and the `ip` and `tc` tools (iproute2).
"""

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


class NetnsUnavailable(RuntimeError):
    """Shaping is impossible here (not root, no iproute2): the message says what to do."""


def check_available():
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            "--link-mbit needs root: it creates a network namespace and shapes its loopback with "
            "`tc qdisc ... tbf` (CAP_NET_ADMIN). Re-run as root (e.g. with sudo), or leave out "
            "--link-mbit to benchmark over the unshaped loopback."
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(
                f"--link-mbit needs the `{tool}` command (package iproute2), which is not on PATH."
            )


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def tbf_args(mbit):
    """tc tbf parameters for `mbit` Mbit/s.

    burst must hold at least one loopback packet (64 KiB MTU, GSO segments included) or tbf drops
    it; the queue limit is half a second of traffic (at least 4 MiB) so TCP is shaped by queueing,
    not by drops and retransmission timeouts.
    """
    if not mbit > 0:
        raise ValueError(f"link_mbit must be > 0, got {mbit}")
    bytes_per_s = mbit * 1e6 / 8
    burst = max(256 * 1024, int(bytes_per_s / 250))  # ~4 ms of traffic
    limit = max(4 * 1024 * 1024, int(bytes_per_s * 0.5))
    return ["rate", f"{mbit}mbit", "burst", str(burst), "limit", str(limit)]


@contextlib.contextmanager
def shaped_namespace(mbit, name=None):
    """Create namespace `name` with its loopback up and shaped to `mbit`; delete it afterwards."""
    check_available()
    name = name or f"torchlane-bench-{os.getpid()}"
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        _run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "tbf", *tbf_args(mbit)])
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def netns_command(name, cmd):
    return ["ip", "netns", "exec", name, *cmd]


def run_group(cmd, env=None, timeout=None):
    """Run cmd in its own process group; on timeout or Ctrl-C end that group (the ranks with it),
    so nothing is left running inside a namespace that is about to be deleted."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise


def torchrun_ranks(tag, script, world_size, argv, link_mbit, json_path, timeout_s):
    """Start `world_size` ranks of `script` with torchrun (OMP_NUM_THREADS=1, TORCHLANE_BENCH_JSON
    defaulting to json_path), inside a namespace whose loopback is shaped to link_mbit when it is
    set. Returns the exit code: 2 when namespaces are unavailable, 124 on timeout (ranks ended)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size}",
        str(script),
        *argv,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCHLANE_BENCH_JSON", str(json_path))
    try:
        if not link_mbit:
            return run_group(cmd, env, timeout_s)
        try:
            with shaped_namespace(link_mbit) as ns:
                print(
                    f"[{tag}] {world_size} ranks in namespace {ns}, loopback shaped to "
                    f"{link_mbit:g} Mbit/s (tbf)",
                    flush=True,
                )
                return run_group(netns_command(ns, cmd), env, timeout_s)
        except NetnsUnavailable as e:
            print(f"[{tag}] {e}", file=sys.stderr)
            return 2
    except subprocess.TimeoutExpired:
        print(f"[{tag}] timed out after {timeout_s:g} s; ranks ended", file=sys.stderr)
        return 124


def _measure_stream(n_bytes=16 * 1024 * 1024):
    """Send n_bytes over one TCP connection on 127.0.0.1; return Mbit/s (run inside the netns)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    received = []

    def sink():
        conn, _ = srv.accept()
        total = 0
        while total < n_bytes:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            total += len(chunk)
        received.append(total)
        conn.sendall(b"k")
        conn.close()

    t = threading.Thread(target=sink)
    t.start()
    c = socket.create_connection(("127.0.0.1", port))
    payload = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    sent = 0
    while sent < n_bytes:
        c.sendall(payload)
        sent += len(payload)
    c.recv(1)
    dt = time.perf_counter() - t0
    c.close()
    t.join()
    srv.close()
    return received[0] * 8 / dt / 1e6


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mbit", type=float, required=True)
    p.add_argument("--check", action="store_true", help="measure one TCP stream through the link")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        print(f"{_measure_stream():.1f}")
        return
    try:
        with shaped_namespace(args.mbit) as ns:
            print(f"namespace {ns}: lo shaped with tbf {' '.join(tbf_args(args.mbit))}")
            if args.check:
                out = subprocess.run(
                    netns_command(
                        ns, [sys.executable, __file__, "--mbit", str(args.mbit), "--inside"]
                    ),
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                print(f"one TCP stream: {float(out):.1f} Mbit/s (link {args.mbit} Mbit/s)")
    except NetnsUnavailable as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
