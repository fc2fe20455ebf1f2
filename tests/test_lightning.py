"""torchlane's Lightning strategy against Lightning's own "ddp" on 2 CPU/Gloo ranks: automatic
and manual optimisation, gradient accumulation, checkpoint/resume, each over 10 optimizer steps
with losses and final parameters bitwise equal. Skipped without lightning (a test-only extra,
`make test-extras` installs it)."""

import importlib.util
import subprocess
import sys

import dist
import lightning_cases
import pytest
import torch

if importlib.util.find_spec("lightning") is None:
    pytest.skip("lightning is a test-only extra (make test-extras)", allow_module_level=True)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("lightning"))
    return dist.run(lightning_cases.compare, 2, args=(tmp,), timeout=400)


def _bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x, y)


@pytest.mark.parametrize(
    "scenario", ["auto", "manual", "manual_static", "accumulate", "checkpointed", "resume"])
def test_losses_bitwise_equal_to_lightning_ddp(compared, scenario):
    for r in compared:
        ref, tl = r[(scenario, "ddp")], r[(scenario, "torchlane_ddp")]
        assert ref["wrapper"] == "torch.nn.parallel.distributed"
        assert tl["wrapper"] == "torchlane.ddp"
        assert len(tl["losses"]) == (5 if scenario == "resume" else
                                     17 if scenario == "accumulate" else 10)
        _bitwise(ref["loss_tensors"], tl["loss_tensors"])
        _bitwise(ref["params"], tl["params"])
        assert tl["val"] == ref["val"]  # trainer.validate after fit ("auto"; None elsewhere)
        assert (tl["val"] is None) == (scenario != "auto")
    # Synchronised: the ranks saw different data yet end with the same parameters.
    _bitwise(compared[0][(scenario, "torchlane_ddp")]["params"],
             compared[1][(scenario, "torchlane_ddp")]["params"])
    assert compared[0][(scenario, "ddp")]["losses"] != compared[1][(scenario, "ddp")]["losses"]


def test_resume_continues_the_uninterrupted_run(compared):
    for r in compared:
        for strategy in ("ddp", "torchlane_ddp"):
            full, resumed = r[("checkpointed", strategy)], r[("resume", strategy)]
            _bitwise(full["loss_tensors"][5:], resumed["loss_tensors"])
            _bitwise(full["params"], resumed["params"])
        # A torch-DDP job's checkpoint resumed by torchlane continues the same trajectory.
        cross = r[("resume_from_ddp", "torchlane_ddp")]
        assert cross["wrapper"] == "torchlane.ddp"
        _bitwise(r[("resume", "ddp")]["loss_tensors"], cross["loss_tensors"])


def test_pytorch_lightning_package_name(compared):
    if ("pytorch_lightning", "ddp") not in compared[0]:
        pytest.skip("pytorch_lightning (the standalone package name) is not installed")
    for r in compared:
        ref, tl = r[("pytorch_lightning", "ddp")], r[("pytorch_lightning", "torchlane_ddp")]
        assert ref["wrapper"] == "torch.nn.parallel.distributed"
        assert tl["wrapper"] == "torchlane.ddp"
        _bitwise(ref["loss_tensors"], tl["loss_tensors"])
        _bitwise(ref["params"], tl["params"])
        # The same training as under the lightning.pytorch name.
        _bitwise(r[("manual", "torchlane_ddp")]["loss_tensors"], tl["loss_tensors"])


def test_strategy_instance_registry_and_bad_arguments(compared):
    for r in compared:
        wrapper, losses, ref = r["instance"]
        assert wrapper == "torchlane.ddp" and losses == ref
        tl_hook, tl_torch_hook, ref_hook, no_hook = r["comm_hook"]
        assert ref_hook["losses"][1:] != no_hook[1:]  # the fp16 hook changes the trajectory
        for out in (tl_hook, tl_torch_hook):
            assert out["losses"] == ref_hook["losses"]
            _bitwise(out["params"], ref_hook["params"])
        assert r["registry"] == {
            "torchlane_ddp": (True, {"start_method": "popen"}),
            "torchlane_ddp_spawn": (True, {"start_method": "spawn"}),
            "torchlane_ddp_fork": (True, {"start_method": "fork"}),
            "torchlane_ddp_notebook": (True, {"start_method": "fork"}),
            "torchlane_ddp_find_unused_parameters_true": (
                True, {"start_method": "popen", "find_unused_parameters": True}),
        }
        kind, msg = r["bucket"]
        assert kind == "ValueError" and "bucket_cap_mb" in msg
        kind, msg = r["unknown"]
        assert kind == "TypeError" and "no_such_arg" in msg


def test_torchlane_imports_without_lightning():
    # Lightning is a test-only extra: with it made unimportable, torchlane still imports, and
    # the integration module says what is missing.
    code = (
        "import sys; sys.modules['lightning'] = None\n"
        "import torchlane, torchlane.integrations\n"
        "try:\n    import torchlane.integrations.lightning\n"
        "except ImportError as e:\n    print('ImportError', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env=dist.subprocess_env(),
    )
    assert out.stdout.startswith("ImportError") and "lightning" in out.stdout
