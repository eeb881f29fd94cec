"""Random models and padded batches for the model-level tests (test_integration.py,
test_patches.py, test_integration_gpu.py).

Every builder seeds torch's generator first, so one set of arguments always gives the same
weights; keyword overrides go to the config's constructor (derived fields such as LLaMA's
``head_dim`` follow them). Pad id 0, bos 1, eos 2; token ids from 3 up.
"""

import torch
from attention_ref import assert_close_to_ref
from transformers import (
    BertConfig,
    BertForMaskedLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedModel,
)

VOCAB = 96
# fp32 models on both sides differ only in summation order (about 1e-7 here); a masking or
# scaling error moves logits by O(0.1). This sits in between.
TOL = dict(rtol=1e-4, atol=1e-5)

# LLaMA-style decoder (LLaMA, Mistral): grouped-query attention, 4 query heads on 2 KV heads of
# head_dim 16.
_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_GPT2 = dict(
    n_embd=32,
    n_layer=2,
    n_head=2,
    n_positions=64,
    vocab_size=VOCAB,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    scale_attn_by_inverse_layer_idx=True,  # a GPT-2 scaling rule that must reach the kernels
)


# A bidirectional encoder: attention through AttentionInterface, masks from
# create_bidirectional_mask.
_BERT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


# ModernBERT: an encoder whose local layers attend to keys at most local_attention / 2 away on
# either side (a bidirectional sliding window), every third layer global.
_MODERNBERT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    local_attention=4,  # keys within 2 on each side
    global_attn_every_n_layers=3,
)


# gpt-oss: attention sinks (one learnable logit per query head, passed as ``s_aux``),
# alternating sliding-window and full layers, GQA, mixture-of-experts MLPs.
_GPT_OSS = dict(
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
    # plain RoPE: the default YaRN parameters assume a 4096-token original context
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


# Gemma 2: attention logits soft-capped (softcap * tanh(s / softcap)), alternating sliding-window
# and full layers. A cap of 2, not Gemma's 50: the random model's scores must reach it.
_GEMMA2 = _DECODER | dict(
    head_dim=16,
    sliding_window=4,
    attn_logit_softcapping=2.0,
    query_pre_attn_scalar=4,  # scale 0.5: larger scores than head_dim's 0.25
    initializer_range=0.1,
)


def _build(model_class, config, device, impl: str) -> PreTrainedModel:
    torch.manual_seed(0)
    model = model_class(config).to(device).eval()
    model.set_attn_implementation(impl)
    return model


def llama(device, impl: str = "eager", **overrides) -> LlamaForCausalLM:
    """A random 2-layer LLaMA in eval mode, running attention ``impl``."""
    return _build(LlamaForCausalLM, LlamaConfig(**(_DECODER | overrides)), device, impl)


def mistral(device, impl: str = "eager", **overrides) -> MistralForCausalLM:
    """A random 2-layer Mistral (LLaMA's shape plus ``sliding_window``, 4096 unless overridden)."""
    return _build(MistralForCausalLM, MistralConfig(**(_DECODER | overrides)), device, impl)


def gpt2(device, impl: str = "eager", **overrides) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 without dropout unless overridden, attention scaled per layer."""
    return _build(GPT2LMHeadModel, GPT2Config(**(_GPT2 | overrides)), device, impl)


def bert(device, impl: str = "eager", **overrides) -> BertForMaskedLM:
    """A random 2-layer BERT encoder with its masked-LM head, without dropout unless overridden."""
    return _build(BertForMaskedLM, BertConfig(**(_BERT | overrides)), device, impl)


def modernbert(device, impl: str = "eager", **overrides) -> ModernBertForMaskedLM:
    """A random 3-layer ModernBERT (layers 1 and 2 local, 0 global), without dropout."""
    config = ModernBertConfig(**(_MODERNBERT | overrides))
    return _build(ModernBertForMaskedLM, config, device, impl)


def gpt_oss(device, impl: str = "eager", **overrides) -> GptOssForCausalLM:
    """A random 2-layer gpt-oss (layer 0 a 4-key sliding window, layer 1 full) whose sinks are
    drawn from N(0, 1), large enough to move every row's softmax (its init gives ~0)."""
    model = _build(GptOssForCausalLM, GptOssConfig(**(_GPT_OSS | overrides)), device, impl)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model


def gemma2(device, impl: str = "eager", **overrides) -> Gemma2ForCausalLM:
    """A random 2-layer Gemma 2 (layer 0 a 4-key sliding window, layer 1 full), its attention
    logits capped at 2."""
    return _build(Gemma2ForCausalLM, Gemma2Config(**(_GEMMA2 | overrides)), device, impl)


MODELS = {"llama": llama, "gpt2": gpt2}


def padded_batch(device, seq: int = 8, padding=((3, 0), (0, 2), (0, 0)), vocab: int = VOCAB):
    """Token ids, attention mask and labels, each (len(padding), seq), one row per
    ``(left, right)`` pad count: by default row 0 left-padded, row 1 right-padded, row 2 not.

    Labels ignore the padding and the first real token of a left-padded row, which the (padded,
    hence arbitrary) position before it predicts.
    """
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (len(padding), seq), device=device)
    mask = torch.ones_like(ids)
    for row, (left, right) in enumerate(padding):
        mask[row, :left] = 0
        mask[row, seq - right :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    predicted_from_padding = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
    labels = ids.masked_fill((mask == 0) | predicted_from_padding, -100)
    return ids, mask, labels


def left_padded_prompts(device):
    """Two 6-token prompts for generation, the first left-padded by 3: ids and attention mask."""
    ids, mask, _ = padded_batch(device, seq=6)
    return ids[[0, 2]], mask[[0, 2]]


def forward_backward(model, ids, mask, labels):
    """One forward and backward pass from zeroed gradients: logits, loss, and a copy of each
    parameter's gradient by name."""
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def step_against_eager(model, impl: str, ids, mask, labels):
    """``forward_backward`` with the model's attention as built (eager), then with ``impl``
    set: (ours, reference), each (logits, loss, grads)."""
    ref = forward_backward(model, ids, mask, labels)
    model.set_attn_implementation(impl)
    return forward_backward(model, ids, mask, labels), ref


def assert_step_matches(ours, ref, mask) -> None:
    """Logits at the real tokens (a padded query's row differs by design: eager's is uniform,
    the kernels' zeros), loss, and every gradient, the same parameters having one, to TOL."""
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = ours, ref
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


def greedy_against_eager(model, impl: str, ids, mask, **kwargs):
    """Greedy ``generate`` of 4 new tokens with the model's attention as built (eager), then
    with ``impl`` set: (ours, reference). ``kwargs`` go to both calls."""
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, **kwargs)
    ref = model.generate(ids, **kwargs)
    model.set_attn_implementation(impl)
    return model.generate(ids, **kwargs), ref


# Model-level rule for low-precision runs (test_integration_gpu.py explains it): at most twice the
# error of each torch attention in the same precision, plus this times max|reference|.
FLOOR = 1e-3


def assert_within_torch_error(name, ours, ref, torch_results):
    """max|ours - ref| <= 2 * max|torch_result - ref| + FLOOR * max|ref|, for every torch
    attention's result in ``torch_results`` (name -> tensor); ours must be finite."""
    assert torch.isfinite(ours).all(), f"{name}: not finite"
    floor = FLOOR * ref.abs().max().item()
    for impl, result in torch_results.items():
        assert torch.isfinite(result).all(), f"{name}: {impl} is not finite, so no bound"
        assert_close_to_ref(f"{name} (bound: {impl})", ours, ref, result, floor)


def token_losses(logits, labels):
    """The cross-entropy of each labelled token, in float32 (the loss is their mean)."""
    labelled = labels[:, 1:] != -100
    return torch.nn.functional.cross_entropy(
        logits[:, :-1][labelled].float(), labels[:, 1:][labelled], reduction="none"
    )
