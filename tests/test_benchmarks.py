"""The benchmarks' own set-up, where it decides what is compared: run small, on any machine
(the timings themselves need a GPU)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench_call  # noqa: E402


def test_bench_call_padded_layer_gives_each_impl_its_own_mask(device, monkeypatch, kernel_calls):
    """The padded layer: ours gets our mask function's padding mask and reaches the kernels as
    the rows' lengths, sdpa gets sdpa_mask's (batch, 1, seq, seq) mask, and the two agree at
    the real tokens (the spot check the results file carries)."""
    monkeypatch.setattr(bench_call, "DEVICE", device)
    monkeypatch.setitem(bench_call.DTYPES, "fp32", torch.float32)
    layer = bench_call.Layer(4, 4, 2, 150, 32, dtype="fp32", lengths=(97, 150, 1, 64))
    impls = bench_call.implementations()
    module = bench_call.AttentionModule(layer)
    q, k, v, dout = bench_call.make_inputs(layer)
    masks = bench_call.layer_masks(layer)
    assert masks["ours"].shape == (4, 150) and masks["sdpa"].shape == (4, 1, 150, 150)
    for name, attn in impls.items():
        dq, dk, dv = bench_call.step(attn, module, layer, q, k, v, dout, "fwd+bwd", masks[name])()
        assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    assert [call["key_lengths"].tolist() for call in kernel_calls] == [[97, 150, 1, 64]]
    check = bench_call.spot_check(impls, module, layer, q, k, v, masks)
    assert not check["nan"] and check["max_abs_diff_vs_sdpa"] < 1e-5
