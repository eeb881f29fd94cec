"""Logit soft-capping (Gemma 2's ``attn_logit_softcapping``): scores capped as softcap *
tanh(scale * q k^T / softcap) inside every kernel (forward, dQ, dK/dV, split-KV decoding), the
backward through the cap's derivative. Held to the reference at the call, with the GPU tables'
block shapes, and in a Gemma 2 model (training step, generation, compile)."""

import pytest
import torch
from test_op import _check, _inputs
from tiny_models import (
    assert_step_matches,
    gemma2,
    greedy_against_eager,
    left_padded_prompts,
    padded_batch,
    step_against_eager,
)

from hf_flashattn import flash_attn, integration
from hf_flashattn.integration import ATTN_IMPLEMENTATION as IMPL
from hf_flashattn.kernels.configs import gpu_configs
from hf_flashattn.op import forced_configs


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_softcap_matches_the_reference(device, dtype, causal):
    """GQA 4:2 with key padding, a ragged length and head dim 80 (two chunks), at a cap the
    scores reach (scale 1: |s| up to ~25 against a cap of 5, so the tanh bends)."""
    q, k, v = _inputs(device, dtype, 2, 4, 2, 70, 70, 80)
    mask = (torch.arange(70)[None, :] < torch.tensor([70, 51])[:, None]).to(device)
    _check(device, dtype, q, k, v, causal=causal, key_padding_mask=mask, scale=1.0, softcap=5.0)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_softcap_with_the_gpu_block_shapes(device, head_dim):
    """The GPU tables' forward, dQ and dK/dV blocks (masked and unmasked stages both met), a
    sliding window over several blocks."""
    table = {name: cfg for name, cfg in gpu_configs()[head_dim].items() if name != "decode"}
    with forced_configs(**table):
        q, k, v = _inputs(device, torch.float16, 1, 2, 1, 300, 300, head_dim)
        _check(device, torch.float16, q, k, v, causal=True, scale=0.5, softcap=4.0)
        _check(device, torch.float16, q, k, v, causal=True, sliding_window=150, softcap=4.0)


def test_softcap_when_decoding(device):
    """Few queries against many keys take the split-KV kernels: capped there too."""
    q, k, v = _inputs(device, torch.float16, 2, 8, 2, 3, 200, 64)
    _check(device, torch.float16, q, k, v, causal=True, scale=1.0, softcap=3.0)


def test_softcap_changes_the_result(device):
    """The cap is not a no-op at these scores (a kernel ignoring it would pass nothing above)."""
    q, k, v = _inputs(device, torch.float32, 1, 2, 2, 20, 20, 32)
    with torch.no_grad():
        capped = flash_attn(q, k, v, scale=1.0, softcap=2.0)
        plain = flash_attn(q, k, v, scale=1.0)
    assert (capped - plain).abs().max() > 0.1


@pytest.mark.parametrize(
    "softcap, error", [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                       ("5", TypeError), (True, TypeError)],
)  # fmt: skip
def test_bad_softcap_is_refused(device, softcap, error):
    q, k, v = _inputs(device, torch.float16, 1, 2, 2, 4, 4, 16)
    with pytest.raises(error, match="softcap"):
        flash_attn(q, k, v, softcap=softcap)


def test_gemma2_padded_batch_matches_eager(device, kernel_calls):
    """A training step of Gemma 2 (logits capped in every layer, a sliding-window layer and a
    full one) on padded rows: logits, loss and every gradient as eager's, no fallback."""
    model = gemma2(device)
    ids, mask, labels = padded_batch(device)
    ours, ref = step_against_eager(model, IMPL, ids, mask, labels)

    assert len(kernel_calls) == model.config.num_hidden_layers
    assert all(c["softcap"] == model.config.attn_logit_softcapping for c in kernel_calls)
    assert_step_matches(ours, ref, mask)


def test_gemma2_greedy_generate_left_padded_matches_eager(device, kernel_calls):
    model = gemma2(device)
    ids, mask = left_padded_prompts(device)
    out, ref = greedy_against_eager(model, IMPL, ids, mask)

    assert len(kernel_calls) == 4 * model.config.num_hidden_layers
    assert torch.equal(out, ref)


def test_softcap_none_is_no_cap(device, kernel_calls):
    """transformers passes softcap=None for models without one: plain attention."""
    q = torch.randn(1, 2, 5, 16, device=device)
    k = v = torch.randn(1, 2, 5, 16, device=device)
    attention = torch.nn.Module()
    attention.is_causal = True
    integration.attention_forward(attention, q, k, v, None, softcap=None)
    assert kernel_calls[0]["softcap"] is None
