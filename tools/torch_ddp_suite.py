"""Run torch's own CPU/Gloo DDP tests (torch/testing/_internal/distributed/distributed_test.py
from the installed wheel) with torchlane.DistributedDataParallel swapped in for torch's.

    python3 tools/torch_ddp_suite.py            the fixed list PASSING (make test-torch-suite)
    python3 tools/torch_ddp_suite.py -k PATTERN  any selection (unittest -k), e.g. -k ddp -v

TORCHLANE_SUITE_REFERENCE=1 runs torch's own DDP instead, for comparison. The swap happens at
import, so the ranks (which re-import this file when spawned) use torchlane too. Ranks are
forked by default, which saves each test the ranks' imports of torch and torchlane (about half of
its time here); TORCHLANE_SUITE_START=spawn spawns them as torch's own runner does.
docs/ddp.md lists every DDP test of the file with its result and why the others are left out.
"""

import os
import sys
import tempfile

# torch's runner treats any CI variable as its own CI: it would write XML reports (and need
# xmlrunner) and look up its disabled-test lists. This is a local run of a fixed list.
os.environ.pop("CI", None)
os.environ.setdefault("BACKEND", "gloo")
os.environ.setdefault("WORLD_SIZE", "2")
os.environ.setdefault("TEMP_DIR", tempfile.mkdtemp(prefix="torchlane_suite_"))
os.environ.setdefault("INIT_METHOD", "env://")

# The tests of _DistTestBase that build a DDP model and run on CPU/Gloo (2 ranks): all pass with
# torch's DDP and with torchlane's. Every other DDP test of the file needs GPUs or is skipped
# upstream (docs/ddp.md); a test of torch's that fails with torchlane is a bug to fix, not one
# to drop from here.
PASSING = (
    "test_DistributedDataParallelCPU",
    "test_DistributedDataParallelCPU_grad_is_view",
    "test_DistributedDataParallel_requires_grad",
    "test_accumulate_gradients_no_sync",
    "test_accumulate_gradients_no_sync_allreduce_hook",
    "test_accumulate_gradients_no_sync_allreduce_with_then_hook",
    "test_accumulate_gradients_no_sync_grad_is_view",
    "test_ddp_create_graph",
    "test_ddp_logging_data_cpu",
    "test_dump_DDP_relevant_env_vars",
    "test_grads_same_across_ranks_with_no_sync",
    "test_static_graph_api_cpu",
)

# torch's common_utils reads the command line when imported: the fixed list goes in first.
if __name__ == "__main__" and len(sys.argv) == 1:
    sys.argv += [f"TestDistBackendWithSpawn.{name}" for name in PASSING]

import torch  # noqa: E402
import torchlane  # noqa: E402

if os.environ.get("TORCHLANE_SUITE_REFERENCE") != "1":  # =1: torch's own DDP, for comparison
    torch.nn.parallel.DistributedDataParallel = torchlane.DistributedDataParallel

from torch.testing._internal.common_utils import run_tests  # noqa: E402
from torch.testing._internal.distributed.distributed_test import (  # noqa: E402
    DistributedTest,
    TestDistBackend,
)


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self):
        super().setUp()
        start = os.environ.get("TORCHLANE_SUITE_START", "fork")
        if start not in ("fork", "spawn"):
            raise ValueError(f"TORCHLANE_SUITE_START must be 'fork' or 'spawn', got {start!r}")
        if start == "spawn":
            self._spawn_processes()
        else:
            self._start_processes(torch.multiprocessing.get_context("fork").Process)


if __name__ == "__main__":
    sys.exit(run_tests())
