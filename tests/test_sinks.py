"""Attention sinks (gpt-oss's ``s_aux``): one learnable logit per query head that joins every
row's softmax and contributes no value. The hook scales the kernels' output by each row's
sigmoid(lse - sink); these tests hold it to a reference that appends the sink as a column, at
the call (with gradients to the sinks) and in a gpt-oss model (training step and generation)."""

import copy

import pytest
import torch
from attention_ref import _visible
from tiny_models import (
    TOL,
    assert_step_matches,
    assert_within_torch_error,
    forward_backward,
    gpt_oss,
    greedy_against_eager,
    left_padded_prompts,
    padded_batch,
    step_against_eager,
)

from hf_flashattn import integration
from hf_flashattn.integration import ATTN_IMPLEMENTATION as IMPL


class _Attention(torch.nn.Module):
    """What the hook reads from a model's attention module."""

    def __init__(self, is_causal: bool):
        super().__init__()
        self.is_causal = is_causal


def _sinks_ref(q, k, v, sinks, scale, causal, key_padding_mask):
    """float64: softmax over [scores, sink] per row, the sink's column dropped before @ v."""
    q, k, v, sinks = (t.double() for t in (q, k, v, sinks))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    visible = _visible(q, k, causal, key_padding_mask, None)
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks[None, :, None, None].expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (probs @ v).transpose(1, 2)  # (batch, seq, heads, dim), as the hook returns


@pytest.mark.parametrize("causal", [True, False])
def test_sinks_match_the_reference_with_gradients(causal, device, kernel_calls):
    """GQA 4:2, ragged length, a left-padded row (causal: its padded queries see nothing, so
    all of their weight goes to the sink: zeros, as eager gives), gradients to q, k, v and the
    sinks themselves."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 7, 16, device=device, requires_grad=True)
    v = torch.randn(2, 2, 7, 16, device=device, requires_grad=True)
    sinks = torch.randn(4, device=device, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    mask[0, :3] = False
    dout = torch.randn(2, 7, 4, 16, device=device)
    out, _ = integration.attention_forward(
        _Attention(causal), q, k, v, mask, scaling=0.3, s_aux=sinks
    )
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    ref = _sinks_ref(q, k, v, sinks, 0.3, causal, mask)
    # float32, as the inputs: the reference's cast to float64 hands its gradients back so
    ref_grads = torch.autograd.grad(ref, (q, k, v, sinks), dout.double())

    assert len(kernel_calls) == 1 and kernel_calls[0]["return_lse"]
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, **TOL)
    if causal:
        assert (out[0, :3] == 0).all()  # padded queries: nothing to attend but the sink
    for name, ours, theirs in zip("q k v sinks".split(), grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_sinks_of_the_wrong_shape_or_type_are_refused(device):
    q = torch.randn(1, 4, 3, 16, device=device)
    k = v = torch.randn(1, 2, 3, 16, device=device)
    attention = _Attention(True)
    with pytest.raises(ValueError, match="s_aux"):
        integration.attention_forward(attention, q, k, v, None, s_aux=torch.zeros(2, device=device))
    with pytest.raises(TypeError, match="s_aux"):
        integration.attention_forward(attention, q, k, v, None, s_aux=[0.0] * 4)


def test_gpt_oss_padded_batch_matches_eager(device, kernel_calls):
    """A training step of gpt-oss (a sliding-window layer and a full one, sinks in both) on a
    left-, a right- and an unpadded row: logits, loss and every gradient, the sinks' included,
    as eager's, with the kernels in every layer."""
    model = gpt_oss(device)
    ids, mask, labels = padded_batch(device)
    ours, ref = step_against_eager(model, IMPL, ids, mask, labels)

    assert len(kernel_calls) == model.config.num_hidden_layers
    assert [c["sliding_window"] for c in kernel_calls] == [4, None]
    assert any("sinks" in name for name in ours[2])
    assert_step_matches(ours, ref, mask)


def test_gpt_oss_greedy_generate_left_padded_matches_eager(device, kernel_calls):
    """Prefill and decoding steps (the split-KV path's lse) with sinks: the same tokens."""
    model = gpt_oss(device)
    ids, mask = left_padded_prompts(device)
    out, ref = greedy_against_eager(model, IMPL, ids, mask)

    assert len(kernel_calls) == 4 * model.config.num_hidden_layers
    assert torch.equal(out, ref)


@pytest.mark.gpu
def test_gpt_oss_bf16_within_twice_eager_error(device, kernel_calls):
    """bf16 on the GPU, at a size where blocks are whole and ragged (4 x 512 tokens, padded
    rows, 8:2 heads of 64): logits and every gradient within twice bf16 eager's error against a
    float32 eager copy of the same weights (sdpa does not take sinks, so eager is the peer)."""
    sizes = dict(
        hidden_size=512,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=2048,
        max_position_embeddings=1024,
        sliding_window=128,
        initializer_range=0.05,
    )
    model = gpt_oss(device, **sizes).to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 would make the reference as coarse
    try:
        ids, mask, labels = padded_batch(device, 512, ((200, 0), (0, 130), (0, 0), (37, 0)), 2048)
        ref_logits, _, ref_grads = forward_backward(reference, ids, mask, labels)
        eager_logits, _, eager_grads = forward_backward(model, ids, mask, labels)
        model.set_attn_implementation(IMPL)
        logits, _, grads = forward_backward(model, ids, mask, labels)
    finally:
        torch.set_float32_matmul_precision(previous)

    assert len(kernel_calls) == model.config.num_hidden_layers
    real = mask.bool()
    assert_within_torch_error(
        "logits", logits[real], ref_logits[real], {"eager": eager_logits[real]}
    )
    for name in ref_grads:
        assert_within_torch_error(
            f"grad {name}", grads[name], ref_grads[name], {"eager": eager_grads[name]}
        )
