"""torchlane.parallel tensor parallelism on Gloo: GPT under (dp, tp) in {(1,2), (2,2), (1,4)},
with and without sequence parallelism, against the one-process model on the same global batch;
a GQA block with torchlane.attention; the distributed matmul exercise; the error messages."""

import dist
import tp_cases


def test_tp2_gpt_gqa_matmul_errors():
    results = dist.run(tp_cases.two_ranks, world_size=2, timeout=300)
    assert results[0] == results[1]  # every rank saw the same (within-tolerance) errors
    assert set(results[0]) == {"gpt(1,2) sp=False", "gpt(1,2) sp=True"}


def test_dp2_tp2_and_tp4_gpt():
    results = dist.run(tp_cases.four_ranks, world_size=4, timeout=400)
    assert len(results[0]) == 4
