"""Adapters (hf_flashattn.patches): route a loaded model's attention modules through the kernels
and undo it exactly. Tiny random fp32 models (tiny_models.py) and their tolerance.

The reference is always the same weights loaded with eager attention and never patched: a patched
model must give eager's logits, gradients and generations whatever implementation it was loaded
with (that decides the mask form the patched modules receive: eager builds an additive float mask,
sdpa a boolean one or none)."""

import copy

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from tiny_models import TOL, gpt2, left_padded_prompts, llama, mistral, padded_batch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention

from hf_flashattn import patches

MODELS = {"llama": (llama, LlamaAttention), "gpt2": (gpt2, GPT2Attention)}
IMPLS = ["eager", "sdpa"]


def test_registry_lists_every_adapter_under_its_model_type():
    assert set(patches.ADAPTERS) == {"llama", "gpt2"}
    for model_type, adapter in patches.ADAPTERS.items():
        assert adapter.MODEL_TYPE == model_type and model_type in CONFIG_MAPPING
        assert callable(adapter.apply) and callable(adapter.revert)
        assert getattr(patches, model_type) is adapter
        assert adapter.ATTENTION_CLASSES == (MODELS[model_type][1],)


def logits_and_grads(model, ids, mask):
    """Logits, and gradients of the real positions' logits (a padded query's row differs by
    design: eager averages every key there, the kernels give zeros)."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    logits[mask.bool()].sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", MODELS)
def test_patched_model_trains_like_eager_and_revert_is_exact(family, impl, device, kernel_calls):
    build, attention_class = MODELS[family]
    reference = build(device, "eager").train()
    model = build(device, impl).train()
    ids, mask, _ = padded_batch(device)
    real = mask.bool()
    eager_logits, eager_grads = logits_and_grads(reference, ids, mask)
    own_logits, own_grads = logits_and_grads(model, ids, mask)
    attention = [m for m in model.modules() if isinstance(m, attention_class)]
    configs = [m.config for m in attention]

    assert patches.apply(model) == len(attention) == model.config.num_hidden_layers
    assert all(patches.is_patched(m) for m in attention)
    assert patches.apply(model) == len(attention)  # idempotent: nothing wrapped twice
    assert all(m.config.original is c for m, c in zip(attention, configs, strict=True))
    assert model.config._attn_implementation == impl  # the model's config is left alone
    assert not any("forward" in vars(m) for m in attention)  # the modules' code is theirs

    logits, grads = logits_and_grads(model, ids, mask)
    assert len(kernel_calls) == len(attention)
    torch.testing.assert_close(logits[real], eager_logits[real], **TOL)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], **TOL, msg=name)

    assert patches.revert(model) == len(attention)
    assert not any(patches.is_patched(m) for m in attention)
    assert all(m.config is c for m, c in zip(attention, configs, strict=True))
    assert patches.revert(model) == 0
    logits, grads = logits_and_grads(model, ids, mask)
    assert torch.equal(logits, own_logits) and len(kernel_calls) == len(attention)
    assert all(torch.equal(grads[name], own_grads[name]) for name in own_grads)


def generate(model, ids, mask, new_tokens):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    return out.sequences, torch.stack(out.scores)


# The bug this guards against: an adapter that ignored the KV cache made each decode step attend
# to one key, so the generated tokens and every step's scores after the first went wrong.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", MODELS)
def test_patched_model_decodes_left_padded_batch_like_eager(family, impl, device, kernel_calls):
    build, _ = MODELS[family]
    ids, mask = left_padded_prompts(device)
    new_tokens = 4
    ref_tokens, ref_scores = generate(build(device, "eager"), ids, mask, new_tokens)
    model = build(device, impl)
    patches.apply(model)
    tokens, scores = generate(model, ids, mask, new_tokens)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    # prefill + one call per further token, in every layer, each with the cache's keys
    layers = model.config.num_hidden_layers
    assert len(kernel_calls) == new_tokens * layers
    assert [c["key_padding_mask"] is not None for c in kernel_calls] == [True] * len(kernel_calls)


def test_patched_gpt2_cross_attention(device, kernel_calls):
    """GPT-2 with cross-attention: self- and cross-attention modules both go to the kernels, and
    the (bidirectional, padded) encoder mask is honoured."""
    model = gpt2(device, "eager", add_cross_attention=True)
    ids, mask, _ = padded_batch(device)
    torch.manual_seed(2)
    encoder = torch.randn(3, 5, 32, device=device)
    encoder_mask = torch.ones(3, 5, dtype=torch.long, device=device)
    encoder_mask[1, -2:] = 0
    kwargs = dict(
        attention_mask=mask, encoder_hidden_states=encoder, encoder_attention_mask=encoder_mask
    )
    ref = model(ids, **kwargs).logits
    assert patches.apply(model) == 2 * model.config.n_layer
    out = model(ids, **kwargs).logits
    assert len(kernel_calls) == 2 * model.config.n_layer
    assert sum(not c["causal"] for c in kernel_calls) == model.config.n_layer
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **TOL)


def test_unknown_model_types_are_refused(device):
    model = mistral(device)
    with pytest.raises(ValueError, match=r"model_type 'mistral'.*gpt2, llama"):
        patches.apply(model)
    with pytest.raises(ValueError, match="no LlamaAttention"):
        patches.llama.apply(gpt2(device, "eager"))
    assert not any(patches.is_patched(m) for m in model.modules())


class HandWrittenAttention(LlamaAttention):
    """An attention module from a modeling file that computes attention itself instead of
    asking transformers' AttentionInterface: routing it would silently do nothing."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (
            p(hidden_states).view(shape).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        k, v = (t.repeat_interleave(self.num_key_value_groups, dim=1) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


def test_modules_that_do_not_dispatch_through_the_interface_are_refused(device):
    model = llama(device)
    model.model.layers[1].self_attn.__class__ = HandWrittenAttention
    with pytest.raises(ValueError, match="HandWrittenAttention does not choose its attention"):
        patches.apply(model)
    assert not any(patches.is_patched(m) for m in model.modules())  # no half-patch


def test_models_building_masks_the_kernels_cannot_read_are_refused(device):
    model = llama(device, "sdpa")
    model.config._attn_implementation = "flex_attention"  # builds a BlockMask, not a tensor
    with pytest.raises(ValueError, match="flex_attention"):
        patches.apply(model)
    assert not any(patches.is_patched(m) for m in model.modules())


def test_patched_config_is_a_live_view_and_survives_deepcopy(device, kernel_calls):
    model = llama(device)
    patches.apply(model)
    attention = model.model.layers[0].self_attn
    model.config.attention_dropout = 0.25  # a change made after patching still reaches it
    assert attention.config.attention_dropout == 0.25
    assert attention.config._attn_implementation == "triton_attention"
    model.config.attention_dropout = 0.0

    copied = copy.deepcopy(model)
    assert all(patches.is_patched(m) for m in (layer.self_attn for layer in copied.model.layers))
    assert copied.model.layers[0].self_attn.config.original is copied.config
    ids, mask, _ = padded_batch(device)
    torch.testing.assert_close(
        copied(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, **TOL
    )
    assert len(kernel_calls) == 2 * model.config.num_hidden_layers


class CountingHook(ModelHook):
    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_accelerate_hooks_survive_apply_and_revert(device, kernel_calls):
    """Models dispatched with device_map carry accelerate hooks around forward: keep them."""
    model = llama(device, "eager")
    attention = [m.self_attn for m in model.model.layers]
    hooks = [CountingHook() for _ in attention]
    for module, hook in zip(attention, hooks, strict=True):
        add_hook_to_module(module, hook)
    old_forwards = [m._old_forward for m in attention]
    ids, mask, _ = padded_batch(device)
    ref = model(ids, attention_mask=mask).logits

    patches.apply(model)
    out = model(ids, attention_mask=mask).logits
    assert len(kernel_calls) == len(attention) and [h.calls for h in hooks] == [2] * len(attention)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **TOL)

    patches.revert(model)
    assert all(m._old_forward is f for m, f in zip(attention, old_forwards, strict=True))
    for module in attention:
        remove_hook_from_module(module)
    assert torch.equal(model(ids, attention_mask=mask).logits, ref)


def test_patched_model_compiles_without_graph_breaks(device):
    """The routed config is read while tracing: dynamo must see through it (fullgraph)."""
    model = llama(device, "sdpa")
    ids, _, _ = padded_batch(device, padding=((0, 0),) * 3)
    ref = llama(device, "eager")(ids).logits
    patches.apply(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids).logits, ref, **TOL)
