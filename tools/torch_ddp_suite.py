"""Run torch's own CPU/Gloo DDP tests (torch/testing/_internal/distributed/distributed_test.py
from the installed wheel) with torchlane.DistributedDataParallel swapped in for torch's.

    python3 tools/torch_ddp_suite.py [-k PATTERN]     (make test-torch-suite)

The swap happens at import, so the spawned ranks (which re-import this file) use torchlane too.
"""

import os
import sys
import tempfile

os.environ.setdefault("BACKEND", "gloo")
os.environ.setdefault("WORLD_SIZE", "2")
os.environ.setdefault("TEMP_DIR", tempfile.mkdtemp(prefix="torchlane_suite_"))
os.environ.setdefault("INIT_METHOD", "env://")

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
        self._spawn_processes()


if __name__ == "__main__":
    sys.exit(run_tests())
