"""Sparse gradients (nn.Embedding(sparse=True)) in torchlane DDP, side by side with torch DDP on
Gloo: gradients (indices, values, coalesced) and parameters bitwise equal on 2 and 3 ranks, a
Python hook's view of the sparse bucket, torchlane's C++ hooks on sparse buckets,
find_unused_parameters, row_sparse_params, and register_comm_hook's checks (Note [Sparse
gradients] in csrc/reducer/reducer.cpp). The 2-rank cases share one spawn (sparse_cases)."""

import dist
import pytest
import sparse_cases


@pytest.fixture(scope="module")
def two_ranks():
    return dist.run(sparse_cases.case_two_ranks, 2)


@pytest.fixture(scope="module")
def one_rank():
    (out,) = dist.run(sparse_cases.case_one_rank, 1)
    return out


def _check_parity(checked):
    for options, kinds in checked:
        assert kinds == ["None", "coo", "coo"], (options, kinds)  # two tables, one dense bucket


def test_sparse_gradients_match_torch_ddp_bitwise_2_ranks(two_ranks):
    for r in two_ranks:
        _check_parity(r["parity"])


def test_sparse_gradients_match_torch_ddp_bitwise_3_ranks():
    for checked in dist.run(sparse_cases.case_parity, 3):
        _check_parity(checked)


def test_python_hook_sees_sparse_bucket_as_in_torch(two_ranks):
    assert [r["python_hook"] for r in two_ranks] == [6, 6]  # three buckets a step, two steps


def test_cpp_hooks_pass_sparse_buckets_through(two_ranks):
    for r in two_ranks:
        assert set(r["cpp_hooks"]) == {"bf16", "powersgd", "topk"}
        assert all(v > 0 for v in r["cpp_hooks"].values()), r["cpp_hooks"]


def test_find_unused_embedding_unused_on_some_ranks(two_ranks):
    assert [r["unused"] for r in two_ranks] == [[False, False, True]] * 2


def test_row_sparse_params_match_dense_and_save_bytes(two_ranks):
    for r in two_ranks:
        saved, dense_sent, row_sent = r["row_sparse"]
        assert saved > 0 and row_sent < dense_sent and dense_sent - row_sent == saved


def test_join_with_sparse_buckets(two_ranks):
    assert [r["join"] for r in two_ranks] == [3, 1]


def test_register_comm_hook_checks_match_torch(one_rank):
    for case, (theirs, ours) in one_rank["hook_contract"]:
        assert theirs is not None and ours is not None, case
        assert ours[0] == theirs[0], (case, theirs, ours)
        assert ours[1].startswith(theirs[1]), (case, theirs, ours)
        assert len(ours[1]) > len(theirs[1]), "torchlane's detail follows torch's sentence"


def test_row_sparse_params_errors(one_rank):
    out = one_rank["errors"]
    assert out[0][0] == "TypeError" and "row_sparse_params" in out[0][1]
    assert out[1][0] == "ValueError" and "'nope'" in out[1][1]
    assert out[2][0] == "TypeError" and "row_sparse_params" in out[2][1]
    assert out[3][0] == "ValueError" and "already gets a sparse gradient" in out[3][1]
    assert out[4][0] == "ValueError" and "not one of the module's parameters" in out[4][1]
