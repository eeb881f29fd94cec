"""Adapters (hf_flashattn.patches): route a loaded model's attention modules through the kernels
and undo it exactly. Tiny random fp32 models (tiny_models.py) and their tolerance."""

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from tiny_models import TOL, gpt2, left_padded_prompts, llama, mistral, padded_batch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention

from hf_flashattn import patches

MODELS = {"llama": (llama, LlamaAttention), "gpt2": (gpt2, GPT2Attention)}


def test_registry_lists_every_adapter_under_its_model_type():
    assert set(patches.ADAPTERS) == {"llama", "gpt2"}
    for model_type, adapter in patches.ADAPTERS.items():
        assert adapter.MODEL_TYPE == model_type and model_type in CONFIG_MAPPING
        assert callable(adapter.apply) and callable(adapter.revert)
        assert getattr(patches, model_type) is adapter


def logits_and_grads(model, ids, mask):
    """Logits, and gradients of the real positions' logits (a padded query's row differs by
    design: eager averages every key there, the kernels give zeros)."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    logits[mask.bool()].sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


# The model's own implementation decides the mask the patched modules receive: eager builds an
# additive float mask, sdpa a boolean one (or none).
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", MODELS)
def test_apply_routes_every_attention_module_and_revert_is_exact(
    family, impl, device, kernel_calls
):
    build, attention_class = MODELS[family]
    model = build(device, impl)
    ids, mask, _ = padded_batch(device)
    real = mask.bool()
    ref, ref_grads = logits_and_grads(model, ids, mask)
    attention = [m for m in model.modules() if isinstance(m, attention_class)]

    assert patches.apply(model) == len(attention) == model.config.num_hidden_layers
    assert all(patches.is_patched(m) for m in attention)
    forwards = [m.forward for m in attention]
    assert patches.apply(model) == len(attention)  # idempotent: nothing wrapped twice
    assert [m.forward for m in attention] == forwards
    assert model.config._attn_implementation == impl  # the config is left alone

    logits, grads = logits_and_grads(model, ids, mask)
    assert len(kernel_calls) == len(attention)
    torch.testing.assert_close(logits[real], ref[real], **TOL)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)

    assert patches.revert(model) == len(attention)
    assert not any(patches.is_patched(m) or "forward" in vars(m) for m in attention)
    assert patches.revert(model) == 0
    logits, grads = logits_and_grads(model, ids, mask)
    assert torch.equal(logits, ref) and len(kernel_calls) == len(attention)
    assert all(torch.equal(grads[name], ref_grads[name]) for name in ref_grads)


def test_patched_llama_generates_like_eager(device, kernel_calls):
    model = llama(device, "sdpa")
    ids, mask = left_padded_prompts(device)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    ref = model.generate(ids, **kwargs)
    patches.llama.apply(model)
    assert torch.equal(model.generate(ids, **kwargs), ref)
    assert len(kernel_calls) == 4 * model.config.num_hidden_layers  # prefill + 3 decode steps


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
