"""ZeRO (torchlane.ShardedDataParallel) beyond tests/test_sharding.py: torch.optim parameter
groups mapped onto the shards, examples/train_gpt.py --zero against --ddp torchlane, sharded
checkpoints through torchlane.checkpoint, mixed precision. Helpers in tests/sharding_more_cases.py."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import dist  # noqa: E402
import sharding_more_cases as cases  # noqa: E402

STEPS = 8


def _close(ref, got, rtol):
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        assert abs(a - b) <= rtol * abs(a), (ref, got)


def test_param_groups_match_ddp_with_the_same_groups():
    """And bad param_groups raise clearly on every rank."""
    combos = [(s, "adamw", None, 1) for s in (1, 2, 3)]
    combos += [(2, "sgd", None, 1), (3, "adamw", 0.05, 2)]  # global-norm clip + no_sync
    results = dist.run(cases.group_trajectories, 3, args=(combos, STEPS), timeout=300)
    for per_rank, ungrouped, errors in results:
        for combo, ref, got in per_rank:
            try:
                _close(ref, got, 1e-6)
            except AssertionError as e:
                raise AssertionError(f"{combo}: {e}") from None
        # the test can fail: one group without weight decay and one lr trains differently
        assert max(abs(a - b) for a, b in zip(per_rank[0][1], ungrouped, strict=True)) > 1e-4
        _check_group_errors(errors)


def _check_group_errors(r):
    assert "not a parameter of the wrapped module" in r["foreign"]
    assert "param_groups[0] and param_groups[1]" in r["twice"]
    assert "param_groups[1] must be a dict" in r["not_dict"]
    assert "param_groups is empty" in r["empty"]
    assert r["frozen_ok"]


# ---- examples/train_gpt.py --zero, run as users run it (torchrun, 2 ranks) ----
GPT_FLAGS = ["--max-steps", "6", "--eval-every", "3", "--ckpt-every", "3"]
GPT_FLAGS += ["--grad-accum", "2", "--clip", "0.1"]


def _train_losses(tmp_path, name, *flags):
    from test_examples import _train

    out = tmp_path / name
    out.mkdir()
    log, stdout = _train(out, *GPT_FLAGS, *flags)
    train = [r["loss"] for r in log if r["type"] == "train"]
    val = [r["val_loss"] for r in log if r["type"] == "val"]
    sample = [r["text"] for r in log if r["type"] == "sample"]
    return train, val, sample, stdout


def test_train_gpt_zero3_logs_the_ddp_losses(tmp_path):
    """--zero 3 --reshard-after-forward (parameter groups with and without weight decay, the global-norm clip over the
    shards, --grad-accum through no_sync, evaluation and sampling from gathered parameters)
    against --ddp torchlane with the same flags: same per-step losses within 1e-5."""
    ref = _train_losses(tmp_path, "ddp", "--ddp", "torchlane")
    # one bucket per block or so, gathered module by module
    got = _train_losses(
        tmp_path, "zero3", "--zero", "3", "--reshard-after-forward", "--bucket-cap-mb", "0.1"
    )
    assert "ZeRO stage 3" in got[3]
    assert len(ref[0]) == 6 and len(ref[1]) == 3
    _close(ref[0], got[0], 1e-5)
    _close(ref[1], got[1], 1e-5)
    assert ref[2] == got[2]  # the sample comes from the exported full state_dict
    assert ref[0][-1] < ref[0][0] - 0.3  # it trains: the comparison is not between constants
    # every rank wrote its shard; the files alone give DDP's final weights
    import torch
    from torchlane import checkpoint

    zero = checkpoint.consolidate(tmp_path / "zero3" / "checkpoints")
    ddp = checkpoint.read(checkpoint.list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1][1])
    assert list(zero) == list(ddp["model"])
    for k, v in ddp["model"].items():
        assert torch.allclose(zero[k], v, rtol=1e-5, atol=1e-6), k

    # resume as users do: the step-3 checkpoint of the stage-3 run, continued at stage 1
    import shutil

    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "zero3" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    for f in (tmp_path / "resumed" / "checkpoints").glob("ckpt-0000000006*"):
        f.unlink()
    from test_examples import _train

    resumed = ("--zero", "1", "--resume")  # and one 25 MB bucket instead of 0.1 MB ones
    log, _ = _train(tmp_path / "resumed", *GPT_FLAGS, *resumed)
    _close(ref[0][3:], [r["loss"] for r in log if r["type"] == "train"], 1e-5)


def test_train_gpt_zero_mixed_precision_tracks_fp32(tmp_path):
    """--zero 2 --mixed-precision bf16: forward/backward on bf16 copies of the fp32 master
    shards. Its losses are not the fp32 run's (bf16 really is used) but stay within bf16's
    rounding of them over the 6 steps (AdamW, clip, grad-accum as above)."""
    ref = _train_losses(tmp_path, "fp32", "--zero", "2")
    got = _train_losses(tmp_path, "bf16", "--zero", "2", "--mixed-precision", "bf16")
    assert "mixed precision bf16" in got[3]
    assert got[0] != ref[0]
    _close(ref[0], got[0], 5e-3)
    _close(ref[1], got[1], 5e-3)
    assert ref[0][-1] < ref[0][0] - 0.3


def test_train_gpt_zero_flag_errors(capsys):
    import pytest
    from train_gpt import parse_args

    for bad in (["--tp", "2"], ["--ddp", "torch"], ["--hook", "bf16"], ["--diloco", "4"]):
        with pytest.raises(SystemExit):
            parse_args(["--zero", "2", *bad])
        assert "--zero works with plain data parallelism" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--zero", "4"])
    with pytest.raises(SystemExit):
        parse_args(["--zero", "2", "--reshard-after-forward"])
    assert "needs --zero 3" in capsys.readouterr().err
    for bad in (
        ["--mixed-precision", "bf16"],
        ["--zero", "1", "--mixed-precision", "bf16", "--dtype", "bf16"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert "--mixed-precision bf16 needs --zero and --dtype fp32" in capsys.readouterr().err
    assert parse_args(["--zero", "1"]).zero == 1


def test_sharded_checkpoint_reshards_3_to_2_and_consolidates(tmp_path):
    """Each rank writes its shard through torchlane.checkpoint (checksummed, atomically, the
    manifest last); saved by 3 ranks at stage 3, loaded by 2 at stage 2, training continues with
    the uninterrupted run's losses; the files alone give the full state_dict of a plain Net."""
    import pytest
    import torch
    from sharding_cases import Net
    from torchlane import checkpoint

    d = str(tmp_path / "ckpt")
    saved = dist.run(cases.sharded_checkpoint, 3, args=(3, d, True), timeout=300)
    files = saved[0]["files"]
    # keep_last=2: steps 3 and 4, each a manifest and 3 shard files; step 2 removed with its shards
    assert files == [
        f"ckpt-{s:010d}{suffix}.pt"
        for s in (3, 4)
        for suffix in ("", ".shard-0-of-3", ".shard-1-of-3", ".shard-2-of-3")
    ]
    full = checkpoint.consolidate(d)
    net = Net()
    net.load_state_dict(full)  # strict: every key, tied weights included
    for k, v in saved[0]["full"].items():
        assert torch.equal(full[k], v), k
    with pytest.raises(checkpoint.CheckpointError, match="consolidate"):
        checkpoint.load(d, Net())

    loaded = dist.run(cases.sharded_checkpoint, 2, args=(2, d, False), timeout=300)
    for r in loaded:
        assert r["step"] == 4 and r["position"] == 4
        assert r["buckets"] > 2  # the saving model had 2 buckets
        _close(saved[0]["losses"], r["losses"], 1e-6)
        assert r["corrupt"] is not None and "CheckpointError" in r["corrupt"], r["corrupt"]
    for r in loaded:  # bad input: clear errors on every rank, nothing loaded or written
        assert "sharded parameters do not match this model's: missing ['0.bias'" in r["other_model"]
        assert "must be its torchlane.ShardedOptimizer" in r["torch_optim"]
    # ranks that read old shard 2 name the file; any other rank learns it from them
    assert any("is corrupt" in r["corrupt"] for r in loaded)
    for r in loaded:
        assert "is corrupt" in r["corrupt"] or "could not be loaded on another rank" in r["corrupt"]


def test_mixed_precision_matches_the_written_out_policy():
    """mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=...) against the same
    policy written out in plain torch (bf16 compute copy, fp32 master, all-reduce in the reduce
    dtype): equal to 1e-6, as both do the same bf16 arithmetic (2 ranks: a two-term sum is exact
    in any order). Against fp32 training the losses differ (bf16 is really used) by less than 2%:
    bf16 keeps 8 significant bits (relative rounding 2^-9 per operation), and 6 steps of a
    3-layer network stay well inside that."""
    import torch
    from sharding_cases import Net

    steps = 6
    results = dist.run(cases.mixed_precision, 2, args=(steps,), timeout=300)
    for r in results:
        for combo, ref, got, dtypes in r["runs"]:
            try:
                _close(ref, got, 1e-6)
            except AssertionError as e:
                raise AssertionError(f"{combo}: {e}") from None
            # compute copy in bf16 (the frozen layer too), master shards and their grads fp32
            assert dtypes == (["torch.bfloat16"], ["torch.float32"], ["torch.float32"]), dtypes
        bf16 = r["runs"][0][2]
        diff = max(abs(a - b) / abs(a) for a, b in zip(r["fp32"], bf16, strict=True))
        assert 1e-5 < diff < 2e-2, diff
        if r["torch_policy"] is not None:
            assert r["torch_policy"] == bf16
        assert r["full_dtypes"] == ["torch.float32"]  # exported from the fp32 masters
        assert "param_dtype must be a floating dtype" in r["bad"]
        assert "either directly or in mixed_precision" in r["both"]
    net = Net()
    net.load_state_dict(results[0]["full"])
    assert torch.equal(net.frozen.weight, results[1]["full"]["frozen.weight"])


def test_stage3_gathers_bucket_by_bucket_with_prefetch():
    """reshard_after_forward=True: each bucket is gathered just before the module that needs it
    (forward and backward) and freed after, the next one prefetched. Same losses as torchlane
    DDP; at most part of the model is ever held in full."""
    steps = 4
    for r in dist.run(cases.per_bucket_stage3, 2, args=(steps,), timeout=300):
        _close(r["ddp"], r[3], 1e-6)
        s = r["stats"]
        assert s["buckets"] >= 4, s
        deep = r["deep"]  # 8 layers in 8 buckets: about 3 held at once (current, next, prefetch)
        assert deep["buckets"] == 8 and deep["peak_bytes"] <= 0.5 * deep["full_bytes"], deep
        assert deep["prefetch_hits"] > 0, deep
        # every micro-batch gathers each bucket for forward and again for backward
        assert s["gathers"] >= 2 * 2 * steps * s["buckets"], s
        assert s["prefetch_hits"] > 0, s
        assert s["held_after_step"] == 0
        assert r["held_in_summon"] == s["full_bytes"] and r["held_after_summon"] == 0
        assert "reshard_after_forward=True applies to stage 3 only" in r["stage2"]


def test_dcp_checkpoint_reshards_and_loads_into_a_plain_module(tmp_path):
    """dcp.save of ShardedCheckpoint at 3 ranks, stage 3; dcp.load at 2 ranks, stage 2, another
    bucket plan, fresh optimizer: the uninterrupted run's losses within 1e-6. The same files load
    into a plain Net in one process (its state_dict keys and shapes) equal to the model's full
    state_dict, tied weights included."""
    import torch
    import torch.distributed.checkpoint as dcp
    from sharding_cases import Net

    d = str(tmp_path / "dcp")
    saved = dist.run(cases.sharded_dcp, 3, args=(3, d, True), timeout=300)
    loaded = dist.run(cases.sharded_dcp, 2, args=(2, d, False), timeout=300)
    for r in loaded:
        assert r["buckets"] > 2  # the saving model had 2 buckets
        _close(saved[0]["losses"], r["losses"], 1e-6)
        assert "model must be a torchlane.ShardedDataParallel" in r["errors"]["model"]
        assert "optimizer must be the torchlane.ShardedOptimizer" in r["errors"]["optim"]
    net = Net()
    sd = net.state_dict()
    dcp.load({"app": {"model": sd}}, checkpoint_id=d, no_dist=True)
    net.load_state_dict(sd)
    for k, v in saved[0]["full"].items():
        assert torch.equal(net.state_dict()[k], v), k
    assert net.head.weight is net.emb.weight


def test_dcp_blocks_cover_flat_ranges_exactly():
    """ShardedCheckpoint's rectangular blocks cover a flat range of a tensor, element for
    element, in order (checked against the range itself for many shapes and ranges)."""
    import random

    import torch
    from torchlane._sharding_dcp import _blocks

    rng = random.Random(0)
    for _ in range(300):
        shape = [rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
        numel = int(torch.Size(shape).numel())
        lo = rng.randint(0, numel - 1)
        hi = rng.randint(lo + 1, numel)
        index = torch.arange(numel).view(shape)
        got = []
        for offsets, sizes in _blocks(shape, lo, hi):
            block = index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
            got += block.reshape(-1).tolist()
        assert got == list(range(lo, hi)), (shape, lo, hi)
        assert len(_blocks(shape, lo, hi)) <= 2 * len(shape) - 1


def test_dcp_checkpoint_of_a_zero_dim_parameter(tmp_path):
    import torch

    for r in dist.run(cases.sharded_dcp_scalar, 2, args=(str(tmp_path / "dcp"),), timeout=300):
        (m0, o0), (m1, o1) = r[0], r[1]
        for k in m0:
            assert torch.equal(m0[k], m1[k]), k
        assert o0["numels"] == o1["numels"]
        for s0, s1 in zip(o0["state"], o1["state"], strict=True):
            for k in s0:
                assert torch.equal(torch.as_tensor(s0[k]), torch.as_tensor(s1[k])), k


def test_dcp_checkpoint_with_mixed_precision(tmp_path):
    """The fp32 masters are what DCP stores under mixed precision: a stage-3 model loading a
    stage-2 save holds the same fp32 state_dict and continues with the same losses."""
    import torch

    for r in dist.run(cases.sharded_dcp_mixed, 2, args=(str(tmp_path / "dcp"),), timeout=300):
        saved, loaded = r[0], r[1]
        assert all(v.dtype == torch.float32 for v in loaded["full"].values())
        for k, v in saved["full"].items():
            assert torch.equal(v, loaded["full"][k]), k
        assert saved["losses"] == loaded["losses"]


@pytest.mark.parametrize("loader", ["fsdp2", "ddp"])
def test_dcp_checkpoint_loads_into_torch_fsdp2_and_ddp(tmp_path, loader):
    """A ShardedCheckpoint (stage 3, 2 ranks) loads into torch's own FSDP2 (fully_shard) and
    DDP models with torch.optim.AdamW through torch's get_state_dict / dcp.load /
    set_state_dict, and they continue with the saving run's losses (AdamW state included)."""
    d = str(tmp_path / "dcp")
    saved = dist.run(cases.sharded_dcp_to_torch, 2, args=(d, None), timeout=300)
    assert saved[0]["buckets"] > 1
    loaded = dist.run(cases.sharded_dcp_to_torch, 2, args=(d, loader), timeout=300)
    _close(saved[0]["losses"], loaded[0]["losses"], 1e-6)
