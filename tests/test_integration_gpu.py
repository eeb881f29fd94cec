"""triton_attention in bfloat16 on a GPU, at the model level: a LLaMA with grouped-query attention
and a GPT-2, both of moderate size, on a padded batch of 512 tokens a row.

Reference: a float32 eager copy of the bf16 model's own weights, so only the arithmetic differs.
Tolerance, the rule of test_op.py taken to whole models: the bf16 triton_attention model's error
against the reference may be at most twice that of the same bf16 model running transformers'
eager attention, and twice that of it running sdpa, plus a floor of 1e-3 * max|reference| (at
most a quarter of a bf16 ulp at the largest value). Errors are maxima over many elements, which
are stable: logits at real (unpadded) positions, each token's loss (rather than their mean, one
number whose error is a sum of errors of both signs, where "twice another's" is a coin toss)
and every parameter's gradient. NaN and inf never pass. A padded query's logits differ by design
(eager: uniform attention, the kernels: zeros) and are left out.

Most of any bf16 model's error comes from its projections and MLPs, common to all three runs;
what the rule catches is an attention error of that size or more. On these random weights a
padding mask dropped (in every call, or only in decode steps), causality dropped, or a softmax
scale off by 1.25x moves the logits 2 to 60 times the bound (checked on the CPU, bodies run
through the interpreter at these sizes and smaller). The kernel-call counts make sure no
comparison quietly ran eager attention on both sides.
"""

import copy
import itertools
import math

import pytest
import torch
from tiny_models import (
    assert_within_torch_error,
    forward_backward,
    gpt2,
    llama,
    padded_batch,
    token_losses,
)
from transformers import LogitsProcessor, LogitsProcessorList

import hf_flashattn

pytestmark = pytest.mark.gpu

IMPL = hf_flashattn.ATTN_IMPLEMENTATION
TORCH_IMPLS = ("eager", "sdpa")
VOCAB = 2048
SEQ = 512
# (left, right) pad counts, one per row: the first left pad covers whole 128-key blocks, the last
# ends inside one.
PADDING = ((200, 0), (0, 130), (0, 0), (37, 0))
PROMPT_PADDING = ((200, 0), (0, 0), (37, 0), (130, 0))  # generation pads on the left only
NEW_TOKENS = 24
STEPS, LR = 5, 1e-3
# initializer_range 0.05, not 0.02: at 0.02 a random model's attention scores are a few tenths,
# softmax is near uniform whatever the scale, and a 1.25x scale error left the logits within the
# bound (seen on the CPU with smaller models).
SIZES = {
    "llama": dict(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        vocab_size=VOCAB,
        initializer_range=0.05,
    ),
    "gpt2": dict(
        n_embd=512, n_layer=4, n_head=8, n_positions=1024, vocab_size=VOCAB, initializer_range=0.05
    ),
}
BUILD = {"llama": llama, "gpt2": gpt2}


@pytest.fixture(autouse=True)
def ieee_float32_matmuls():
    """TF32 matmuls would give the float32 reference errors (~1e-3) as large as bf16's."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def bf16_and_reference(family, device, **overrides):
    """The bf16 model, and a float32 eager copy of the very same (bf16-rounded) weights."""
    model = BUILD[family](device, **(SIZES[family] | overrides)).to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    return model, reference


@pytest.mark.parametrize("family", BUILD)
def test_bf16_forward_backward_within_twice_torch_error(family, device, kernel_calls):
    """One forward and backward pass over the padded batch, with its loss."""
    model, reference = bf16_and_reference(family, device)
    ids, mask, labels = padded_batch(device, SEQ, PADDING, VOCAB)
    ref_logits, _, ref_grads = forward_backward(reference, ids, mask, labels)
    torch_logits, torch_grads = {}, {}
    for impl in TORCH_IMPLS:
        model.set_attn_implementation(impl)
        torch_logits[impl], _, torch_grads[impl] = forward_backward(model, ids, mask, labels)
    assert not kernel_calls
    model.set_attn_implementation(IMPL)
    logits, loss, grads = forward_backward(model, ids, mask, labels)

    assert len(kernel_calls) == model.config.num_hidden_layers  # every layer, no fallback
    real = mask.bool()
    assert_within_torch_error(
        "logits", logits[real], ref_logits[real], {i: x[real] for i, x in torch_logits.items()}
    )
    losses = token_losses(logits, labels)
    torch.testing.assert_close(loss, losses.mean())  # the loss, token by token
    assert_within_torch_error(
        "token losses",
        losses,
        token_losses(ref_logits, labels),
        {i: token_losses(x, labels) for i, x in torch_logits.items()},
    )
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_within_torch_error(
            f"grad {name}",
            grads[name],
            ref_grads[name],
            {i: g[name] for i, g in torch_grads.items()},
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_forward_backward_within_twice_torch_error(dtype, device, kernel_calls):
    """float32 weights under autocast, as Trainer(bf16=True) / (fp16=True) runs them: q/k leave
    the rotary embedding in float32, v in the autocast dtype, and the kernels run in the latter.
    Reference: the same float32 model without autocast."""
    model = llama(device, **SIZES["llama"])
    ids, mask, labels = padded_batch(device, SEQ, PADDING, VOCAB)
    ref_logits, _, ref_grads = forward_backward(model, ids, mask, labels)
    results = {}
    for impl in (*TORCH_IMPLS, IMPL):
        model.set_attn_implementation(impl)
        with torch.autocast(device, dtype=dtype):
            results[impl] = forward_backward(model, ids, mask, labels)
    logits, _, grads = results.pop(IMPL)

    assert len(kernel_calls) == model.config.num_hidden_layers  # every layer, no fallback
    real = mask.bool()
    assert_within_torch_error(
        "logits", logits[real], ref_logits[real], {i: r[0][real] for i, r in results.items()}
    )
    assert_within_torch_error(
        "token losses",
        token_losses(logits, labels),
        token_losses(ref_logits, labels),
        {i: token_losses(r[0], labels) for i, r in results.items()},
    )
    for name in ref_grads:
        assert_within_torch_error(
            f"grad {name}",
            grads[name],
            ref_grads[name],
            {i: r[2][name] for i, r in results.items()},
        )


class ForceTokens(LogitsProcessor):
    """Makes greedy search pick ``tokens[:, step]`` at each step: a replay of a generation, in
    which another model computes its logits in exactly the same contexts (cache, positions)."""

    def __init__(self, tokens, prompt_len):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids, scores):
        forced = self.tokens[:, input_ids.shape[1] - self.prompt_len, None]
        return torch.full_like(scores, -float("inf")).scatter(1, forced, 0.0)


def generate(model, ids, mask, forced=None):
    """Greedy generation of NEW_TOKENS with a KV cache (never stopping early). Returns the new
    tokens (batch, NEW_TOKENS) and each step's raw logits (batch, NEW_TOKENS, vocab) in float32;
    ``forced`` (batch, NEW_TOKENS): tokens to pick instead of the argmax."""
    processors = LogitsProcessorList()
    if forced is not None:
        processors.append(ForceTokens(forced, ids.shape[1]))
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        logits_processor=processors,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[:, ids.shape[1] :]
    assert forced is None or torch.equal(tokens, forced), "the replay went its own way"
    return tokens, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", BUILD)
def test_bf16_greedy_generation_within_twice_torch_error(family, device, kernel_calls):
    """Each generated step's logits, decoding left-padded prompts from a KV cache. The reference
    and the bf16 torch attentions replay the tokens triton_attention chose, so all see the same
    contexts whatever bf16 rounding did to the choices. (Tokens are not compared: bf16 may flip
    a near-tie. Within the bound, the argmaxes agree wherever the reference's top-1 margin
    exceeds twice the bound.)"""
    model, reference = bf16_and_reference(family, device)
    ids, mask, _ = padded_batch(device, SEQ, PROMPT_PADDING, VOCAB)
    model.set_attn_implementation(IMPL)
    tokens, logits = generate(model, ids, mask)
    # the prefill and NEW_TOKENS - 1 single-query decode steps, in every layer
    assert len(kernel_calls) == NEW_TOKENS * model.config.num_hidden_layers
    _, ref_logits = generate(reference, ids, mask, forced=tokens)
    torch_logits = {}
    for impl in TORCH_IMPLS:
        model.set_attn_implementation(impl)
        torch_logits[impl] = generate(model, ids, mask, forced=tokens)[1]
    assert len(kernel_calls) == NEW_TOKENS * model.config.num_hidden_layers
    assert_within_torch_error("generated logits", logits, ref_logits, torch_logits)


@pytest.mark.parametrize("family", BUILD)
def test_bf16_training_lowers_the_loss(family, device, kernel_calls):
    """AdamW on bf16 weights (no float32 master copy), attention dropout on, one padded batch:
    the loss falls, and losses, gradients and weights stay finite."""
    dropout = {"llama": {"attention_dropout": 0.1}, "gpt2": {"attn_pdrop": 0.1}}[family]
    model = BUILD[family](device, IMPL, **(SIZES[family] | dropout)).to(torch.bfloat16).train()
    ids, mask, labels = padded_batch(device, SEQ, PADDING, VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        for name, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), f"step {len(losses)}: grad {name} not finite"
        optimizer.step()
        losses.append(loss.item())
    assert len(kernel_calls) == STEPS * model.config.num_hidden_layers
    assert all(c["dropout_p"] == 0.1 for c in kernel_calls)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # at these sizes each step lowers the loss by 1 to 3 (seen on the CPU), far more than
    # dropout's randomness moves it
    assert all(math.isfinite(x) for x in losses), losses
    assert all(after < before for before, after in itertools.pairwise(losses)), losses
