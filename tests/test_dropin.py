"""torchlane DDP where libraries expect torch DDP: isinstance, the reducer protocol Lightning and
accelerate drive, no silent gradient loss, pickling, DCP checkpoints both ways, torch.compile."""

import dist
import dropin_cases
import pytest
import torch


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=False):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def protocol():
    return dist.run(dropin_cases.protocol, 2)


@pytest.fixture(scope="module")
def api():
    return dist.run(dropin_cases.api, 2)


def test_is_a_torch_ddp(protocol):
    assert all(r["isinstance"] for r in protocol)


@pytest.mark.parametrize("case", ["second_backward", "trigger_sync", "accumulate"])
def test_reducer_protocol_matches_torch_ddp(protocol, case):
    for r in protocol:
        _same(*r[case])
    # Synchronised: both ranks hold the same gradients although their data differ.
    _same(protocol[0][case][0], protocol[1][case][0])


def test_no_sync_then_unused_matches_torch_ddp(protocol):
    # Layers used only inside no_sync() are still averaged at the synchronised step, as torch.
    for r in protocol:
        tl, th = r["no_sync_unused"]
        assert all(g is not None for g in th)
        _same(tl, th)
    _same(protocol[0]["no_sync_unused"][0], protocol[1]["no_sync_unused"][0])


def test_no_silent_gradient_loss(protocol):
    for r in protocol:
        for case in ("unprepared_second", "through_module"):
            kind, msg = r[case]
            assert kind == "RuntimeError"
            assert "no synchronised forward prepared" in msg and "no_sync" in msg
        _same(*r["no_sync_local"])


def test_static_graph_and_logging(api):
    for r in api:
        static, tl, th = r["static_graph"]
        assert static
        _same(tl, th)
        assert r["static_late"] is None
        assert r["static_after_forward"][0] == "RuntimeError"
        assert "before the first forward" in r["static_after_forward"][1]
        # torch's test_static_graph_api_cpu matches torch's wording.
        assert "should be called before training loop starts" in r["static_after_forward"][1]
        for key in (
            "world_size",
            "rank",
            "bucket_cap_bytes",
            "static_graph",
            "backend_name",
            "module_name",
            "find_unused_parameters",
            "gradient_as_bucket_view",
        ):
            assert r["logging"][key] == r["logging_torch"][key], key
        assert r["sample_rate_bad"][0] == "ValueError"
        assert r["fused_optim"][0] == "NotImplementedError"
        assert r["inherited"][0] == "NotImplementedError" and "_sync_buffers" in r["inherited"][1]
        assert r["reducer_unknown"][0] == "AttributeError"
        assert r["rebuild"] is False  # buckets were rebuilt after the first iteration already


def test_runtime_logging_matches_torch_ddp(api):
    for r in api:
        tl, th = r["runtime_logging"]["tl"], r["runtime_logging"]["th"]
        # The same keys as torch's logging data, and the same values but for the measured times.
        final_tl, final_th = r["runtime_logging"]["tl_final"], r["runtime_logging"]["th_final"]
        assert set(final_tl) == set(final_th)
        for key, value in final_th.items():
            if "time" not in key:
                assert final_tl[key] == value, key
        # The same sampled iterations as torch (1-10, then every 3rd), no_sync/no_grad uncounted.
        assert [it for it, _ in tl] == [it for it, _ in th]
        assert [it for it, _ in th] == [*range(11), 10, 12, 12]
        for (_, times), (_, times_th) in zip(tl, th, strict=True):
            assert {k for k, v in times.items() if v is not None} == {
                k for k, v in times_th.items() if v is not None
            }
            if times["forward_compute_time"] is None:
                continue  # nothing sampled yet
            assert all(v >= 1 for k, v in times.items() if "overlap" not in k), times
            for prefix in ("", "avg_"):
                overlap = times[f"{prefix}backward_compute_comm_overlap_time"]
                assert 0 <= overlap <= times[f"{prefix}backward_compute_time"]
                assert overlap <= times[f"{prefix}backward_comm_time"]


def test_deepcopy_and_torch_save(api):
    for r in api:
        out = r["pickled"]
        assert {v[0] for v in out.values()} == {"DistributedDataParallel"}
        _same(out["orig"][1], out["copy"][1])
        _same(out["orig"][1], out["loaded"][1])
        assert not r["shares_params"]


def test_profiler_ranges(api):
    for r in api:
        for name in (
            "torchlane::copy_bucket_to_grad",
            "torchlane::cast_compress",
            "torchlane::cast_decompress",
            "torchlane::allreduce_bucket",
        ):
            assert name in r["ranges"], r["ranges"]
        # P = M Q and Q = M^T P run in the hook (the backward's thread); M = P Q^T
        # (torchlane::powersgd_decompress) in the second all-reduce's callback, often on Gloo's
        # thread, which the profiler does not record.
        for name in (
            "torchlane::powersgd_compress_p",
            "torchlane::powersgd_compress_q",
            "torchlane::powersgd_orthogonalize",
            "torchlane::copy_bucket_to_grad",
        ):
            assert name in r["powersgd_ranges"], r["powersgd_ranges"]


def test_dcp_checkpoints_load_across_torch_and_torchlane(tmp_path):
    res = dist.run(dropin_cases.dcp, 2, args=(str(tmp_path),))
    for r in res:
        for tag in ("th2tl", "tl2th"):
            src_keys, dst_keys = r[tag]["keys"]
            assert src_keys == dst_keys and not any(k.startswith("module.") for k in src_keys)
            for got, want in zip(r[tag]["dst"], r[tag]["src"], strict=False):
                assert got.keys() == want.keys()
                for k in want:
                    if isinstance(want[k], torch.Tensor):
                        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
                    else:
                        assert got[k] == want[k], k


def test_torch_compile_like_torch_ddp():
    """Compiled, torchlane DDP behaves as compiled torch DDP: dynamo compiles the wrapped module's
    forward (no graph break inside it; the one break is at torch DDP's `_inside_ddp_forward`, which
    dynamo skips on purpose for either DDP), DDPOptimizer splits it at the same bucket boundaries,
    the losses equal eager mode's, and the C++ hooks still launch buckets during backward."""
    res = dist.run(dropin_cases.compiled, 2)
    for r in res:
        tl, ref = r["compiled"], r["torch_compiled"]
        assert tl["breaks"], "expected dynamo's break at _inside_ddp_forward"
        assert all(
            b.endswith("DistributedDataParallel._inside_ddp_forward") for b in tl["breaks"]
        ), tl
        assert set(tl["breaks"]) <= set(ref["breaks"]), (tl["breaks"], ref["breaks"])
        # DDPOptimizer split the module's graph at the bucket boundaries, as for torch DDP.
        assert len(tl["graphs"]) > 1 and tl["graphs"] == ref["graphs"], (tl, ref)
        for a, b in zip(r["eager"]["losses"], tl["losses"], strict=True):
            assert abs(a - b) <= 1e-6 * abs(a)
        for a, b in zip(ref["losses"], tl["losses"], strict=True):
            assert abs(a - b) <= 1e-6 * abs(a)
        # The compiled backward still fires the C++ hooks: all but the last bucket launch before
        # the backward pass ends, as in eager mode.
        buckets, overlapped = tl["overlap"]
        assert buckets > 1 and overlapped >= buckets - 1, tl["overlap"]
        assert r["eager"]["overlap"][0] == buckets


def test_accelerate_uses_torchlane_model_as_is(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is a test-only extra (make test-extras)")
    res = dist.run(dropin_cases.accelerate_case, 2, args=(str(tmp_path), dist.free_port()))
    for r in res:
        assert r["used_as_is"] and r["unwrapped"]
        assert r["torch_type"] == "torch.nn.parallel.distributed"
        assert r["auto_type"] == "torchlane.ddp"
        # Gradient accumulation (no_sync on odd micro-steps) reaches torchlane: bitwise equal.
        assert r["tl_losses"] == r["torch_losses"]
        _same(r["tl_params"], r["torch_params"])
        assert r["tl_keys"] == r["torch_keys"] and not any(
            k.startswith("module.") for k in r["tl_keys"]
        )
        assert r["saved_keys"]["tl"] == r["saved_keys"]["torch"] is not None
    _same(res[0]["tl_params"], res[1]["tl_params"])
