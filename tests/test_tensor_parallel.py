"""torchlane.parallel tensor parallelism on Gloo: GPT under (dp, tp) in {(1,2), (2,2), (1,4)},
with and without sequence parallelism, against the one-process model on the same global batch;
a GQA block with torchlane.attention; the distributed matmul exercise; the error messages;
examples/train_gpt.py --tp against the one-process and the DDP runs."""

import dist
import torch
import tp_cases
from test_examples import _train


def test_tp2_gpt_gqa_matmul_errors():
    results = dist.run(tp_cases.two_ranks, world_size=2, timeout=300)
    assert results[0] == results[1]  # every rank saw the same (within-tolerance) errors
    assert set(results[0]) == {"gpt(1,2) sp=False", "gpt(1,2) sp=True", "gpt(1,2) sp=True float64"}


def test_dp2_tp2_and_tp4_gpt():
    results = dist.run(tp_cases.four_ranks, world_size=4, timeout=400)
    assert len(results[0]) == 4


# ---- examples/train_gpt.py --tp, run as users run it (torchrun) ----

STEPS = ["--max-steps", "5", "--eval-every", "5", "--lr", "3e-3"]


def _losses(log):
    """The 5 training losses and the validation losses at steps 0 and 5."""
    train = [r["loss"] for r in log if r["type"] == "train"]
    val = {r["step"]: r["val_loss"] for r in log if r["type"] == "val"}
    return torch.tensor(train + [val[0], val[5]])


def test_train_gpt_tp2_matches_one_process_and_resumes(tmp_path):
    one, _ = _train(tmp_path / "one", *STEPS, nproc=1)
    # 3 steps, a checkpoint per tp rank, then --resume for the rest: the whole log is compared.
    _, out = _train(tmp_path / "tp", *STEPS, "--tp", "2", "--stop-at", "3", nproc=2)
    assert "dp=1, tp=2" in out
    tp, out = _train(tmp_path / "tp", *STEPS, "--tp", "2", "--resume", nproc=2)
    assert "resumed at step 3" in out
    assert [r["step"] for r in tp if r["type"] == "train"] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(_losses(tp), _losses(one), rtol=1e-4, atol=0)


def test_train_gpt_dp2_tp2_sequence_parallel_matches_ddp(tmp_path):
    ddp, _ = _train(tmp_path / "ddp", *STEPS, "--ddp", "torchlane", nproc=2)
    tp, out = _train(tmp_path / "tp", *STEPS, "--tp", "2", "--sequence-parallel", nproc=4)
    assert "dp=2, tp=2 (sequence parallel)" in out
    torch.testing.assert_close(_losses(tp), _losses(ddp), rtol=1e-4, atol=0)
