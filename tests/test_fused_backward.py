"""The fused backward: dQ added with atomics inside the dK/dV pass (kernels/bwd.py FUSE_DQ)."""

import pytest
import torch
from test_op import _check, _check_dropout, _inputs
from test_op import test_lse_gradient as lse_gradient_case

from hf_flashattn import flash_attn, op


@pytest.fixture
def fused(monkeypatch) -> list[bool]:
    """Every backward fused; records what each backward chose."""
    monkeypatch.setattr(op, "FUSED_BACKWARD_MIN_WORK", 0)
    chosen = []
    fuse_dq = op._fuse_dq

    def spy(q, k):
        chosen.append(fuse_dq(q, k))
        return chosen[-1]

    monkeypatch.setattr(op, "_fuse_dq", spy)
    return chosen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "heads_q,heads_kv,seqlen_q,seqlen_k", [(4, 4, 130, 130), (8, 2, 97, 200), (4, 1, 200, 65)]
)
def test_fused_backward_matches_reference(
    device, fused, causal, heads_q, heads_kv, seqlen_q, seqlen_k
):
    """Several query and key blocks (dQ rows receive several key blocks' additions), GQA, MQA,
    ragged ends, seq_q > seq_k (causal rows that see no key)."""
    q, k, v = _inputs(device, torch.float16, 2, heads_q, heads_kv, seqlen_q, seqlen_k, 64)
    mask = torch.ones(2, seqlen_k, dtype=torch.bool)
    mask[1, seqlen_k // 2 :] = False
    _check(device, torch.float16, q, k, v, causal=causal, key_padding_mask=mask.to(device))
    assert fused and all(fused)


def test_fused_backward_with_dropout(device, fused):
    _check_dropout(device, 130, 0.25, True, seed=5)
    assert fused and all(fused)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_backward_lse_gradient(device, fused, causal):
    lse_gradient_case(device, causal)
    assert fused and all(fused)


def test_fused_backward_in_float32_and_bfloat16(device, fused):
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _inputs(device, dtype, 1, 2, 2, 97, 130, 80)
        _check(device, dtype, q, k, v, causal=True)


def test_deterministic_algorithms_keep_the_two_pass_backward(device, monkeypatch):
    monkeypatch.setattr(op, "FUSED_BACKWARD_MIN_WORK", 0)
    q, k, v = _inputs(device, torch.float16, 1, 2, 2, 64, 64, 64)
    assert op._fuse_dq(q, k)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert not op._fuse_dq(q, k)
        grads = [torch.autograd.grad(flash_attn(q, k, v).sum(), (q, k, v)) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("max_dim", [64, 128])
def test_fused_backward_with_the_gpu_block_configs(device, fused, max_dim):
    """The dK/dV and dQ block shapes the GPU runs, forced through whichever backend is here."""
    from hf_flashattn.kernels.configs import gpu_configs

    with op.forced_configs(**gpu_configs()[max_dim]):
        q, k, v = _inputs(device, torch.float16, 2, 4, 2, 97, 300, max_dim)
        _check(device, torch.float16, q, k, v, causal=True)
