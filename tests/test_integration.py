"""attn_implementation="triton_attention" against transformers' eager attention on tiny random
models (fp32, CPU through Triton's interpreter, or a GPU); bf16 on larger models is in
test_integration_gpu.py.

Tolerances: both sides compute in float32, so tiny_models.TOL (see there). Fallback tests run the
very same eager function on the very same mask, so they ask for equality. Under autocast, the
low-precision rule of tiny_models.assert_within_torch_error against the float32 model.
"""

import importlib.util
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from tiny_models import (
    MODELS,
    TOL,
    assert_step_matches,
    assert_within_torch_error,
    bert,
    forward_backward,
    gpt2,
    gpt_oss,
    greedy_against_eager,
    left_padded_prompts,
    llama,
    mistral,
    modernbert,
    padded_batch,
    step_against_eager,
    token_losses,
)
from torch._dynamo.backends.registry import lookup_backend
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    chunked_causal_mask_function,
    eager_mask,
    sdpa_mask,
    sliding_window_bidirectional_mask_function,
    sliding_window_causal_mask_function,
)
from transformers.models.llama import modeling_llama

import hf_flashattn
from hf_flashattn import integration, op, support
from hf_flashattn.integration import EagerFallbackWarning, KernelMask, kernel_mask

IMPL = hf_flashattn.ATTN_IMPLEMENTATION


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which fallback reasons were warned about, and record the warnings from here on."""
    monkeypatch.setattr(integration, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def assert_equal(actual, expected):
    """Bitwise equal; NaN equals NaN (eager's fully padded rows overflow in float64)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def fallback_messages(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, EagerFallbackWarning)]


# ---------------------------------------------------------------------------- registration
def test_import_registers_both_interfaces_idempotently():
    assert IMPL == "triton_attention" and "flash" not in IMPL
    for _ in range(2):
        assert AttentionInterface()[IMPL] is integration.attention_forward
        assert AttentionMaskInterface()[IMPL] is integration.attention_mask
        hf_flashattn.register()


def test_readme_tables_copy_the_feature_list_and_the_fallback_reasons():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for feature, text in support.SUPPORTED_FEATURES.items():
        assert f"| {feature} | {text} |" in readme
    for reason, text in support.FALLBACK_REASONS.items():
        assert f"| `{reason}` | {text} |" in readme
    assert len(set(support.FALLBACK_REASONS.values())) == len(support.FALLBACK_REASONS)


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("family", MODELS)
def test_padded_batch_matches_eager(family, device, kernel_calls):
    model = MODELS[family](device)
    ids, mask, labels = padded_batch(device)
    ours, ref = step_against_eager(model, IMPL, ids, mask, labels)

    assert len(kernel_calls) == model.config.num_hidden_layers  # every layer, no fallback
    assert all(c["key_padding_mask"] is not None and c["causal"] for c in kernel_calls)
    assert_step_matches(ours, ref, mask)


@pytest.mark.parametrize("family", MODELS)
def test_right_padded_batch_reaches_the_kernels_as_lengths(family, device, kernel_calls):
    """A padding collator's batch (right padding only): the mask function's one sync finds
    every row a prefix, and every layer hands the kernels the rows' lengths, no mask."""
    model = MODELS[family](device)
    ids, mask, labels = padded_batch(device, padding=((0, 3), (0, 0), (0, 7)))
    ours, ref = step_against_eager(model, IMPL, ids, mask, labels)

    assert len(kernel_calls) == model.config.num_hidden_layers
    for call in kernel_calls:
        assert call["key_padding_mask"] is None
        assert call["key_lengths"].tolist() == [5, 8, 1]
    assert_step_matches(ours, ref, mask)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_generate_left_padded_matches_eager(cache_implementation, device, kernel_calls):
    model = llama(device)
    ids, mask = left_padded_prompts(device)
    out, ref = greedy_against_eager(
        model, IMPL, ids, mask, cache_implementation=cache_implementation
    )

    assert len(kernel_calls) == 4 * model.config.num_hidden_layers  # prefill + 3 decode steps
    assert torch.equal(out, ref)


def test_from_config_and_from_pretrained(tmp_path, device, kernel_calls):
    eager = llama(device)
    eager.save_pretrained(tmp_path)
    ids, mask, _ = padded_batch(device)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=IMPL).to(device)
    assert loaded.config._attn_implementation == IMPL
    torch.testing.assert_close(
        loaded(ids, attention_mask=mask).logits[mask.bool()],
        eager(ids, attention_mask=mask).logits[mask.bool()],
        **TOL,
    )
    assert len(kernel_calls) == eager.config.num_hidden_layers

    built = AutoModelForCausalLM.from_config(eager.config, attn_implementation=IMPL)
    assert built.config._attn_implementation == IMPL


def test_set_attn_implementation_back_and_forth(device, kernel_calls):
    model = llama(device)
    ids, mask, _ = padded_batch(device)
    ref = model(ids, attention_mask=mask).logits
    for _ in range(2):
        model.set_attn_implementation(IMPL)
        assert model.config._attn_implementation == IMPL
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits[mask.bool()], ref[mask.bool()], **TOL
        )
        model.set_attn_implementation("eager")
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    assert len(kernel_calls) == 2 * model.config.num_hidden_layers


@pytest.mark.parametrize("family", MODELS)
def test_training_with_dropout_lowers_the_loss(family, device, kernel_calls):
    dropout = {"llama": {"attention_dropout": 0.1}, "gpt2": {"attn_pdrop": 0.1}}[family]
    model = MODELS[family](device, IMPL, **dropout).train()
    ids, mask, labels = padded_batch(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(c["dropout_p"] == 0.1 for c in kernel_calls) and kernel_calls
    assert losses[-1] < losses[0], losses
    # Dropout is live in training and off in eval.
    with torch.no_grad():
        assert not torch.equal(
            model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
        model.eval()
        assert torch.equal(
            model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )


def test_gradient_checkpointing_reproduces_gradients(device, kernel_calls):
    """Recomputation must redraw the same dropout mask: same gradients with and without."""
    model = llama(device, IMPL, attention_dropout=0.1).train()
    ids, mask, labels = padded_batch(device)
    torch.manual_seed(2)
    _, ref_loss, ref_grads = forward_backward(model, ids, mask, labels)
    # activation_checkpointing_enable supersedes gradient_checkpointing_enable in transformers 5.23
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    n_calls = len(kernel_calls)
    torch.manual_seed(2)
    _, loss, grads = forward_backward(model, ids, mask, labels)

    assert len(kernel_calls) == 3 * n_calls  # the checkpointed forward ran twice
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


COMPILE_CASES = {
    # name: (builder, config overrides, padded)
    "llama, padded": (llama, {}, True),
    # the window covers every key: plain causal, no (q, k) mask to read
    "mistral, padded": (mistral, {"sliding_window": 16}, True),
    "mistral, unpadded": (mistral, {"sliding_window": 16}, False),
    # a causal decoder run bidirectionally
    "llama is_causal=False, padded": (llama, {"is_causal": False}, True),
    "llama is_causal=False, unpadded": (llama, {"is_causal": False}, False),
    # attention sinks: the lse output and the rescaling trace into the graph (the experts as
    # a batched matmul: transformers 5.17's grouped_mm fallback guards on data under compile)
    "gpt-oss, padded": (
        gpt_oss,
        {"sliding_window": 16, "experts_implementation": "batched_mm"},
        True,
    ),
    "bert, padded": (bert, {}, True),
    "bert, unpadded": (bert, {}, False),
}


def compile_fullgraph(model) -> tuple[torch.nn.Module, list[torch.fx.GraphModule]]:
    """``model`` compiled with fullgraph=True by aot_eager, and the list of graphs it captures."""
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(model, backend=recording_aot_eager, fullgraph=True), graphs


def assert_one_graph_calling_the_kernels(graphs, model):
    assert len(graphs) == 1
    assert graphs[0].code.count("hf_flashattn.fwd") == model.config.num_hidden_layers


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_torch_compile_fullgraph(case, device):
    """Dynamo captures the whole forward in one graph (no .item()/.all() on the mask), with one
    kernel call per layer; AOT autograd traces it through the fake kernels."""
    build, overrides, padded = COMPILE_CASES[case]
    model = build(device, **overrides)
    ids, mask, _ = padded_batch(device)
    if not padded:
        mask = torch.ones_like(mask)
    ref = model(ids, attention_mask=mask).logits
    model.set_attn_implementation(IMPL)
    compiled, graphs = compile_fullgraph(model)
    logits = compiled(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], **TOL)
    assert_one_graph_calling_the_kernels(graphs, model)


def test_torch_compile_fullgraph_under_autocast(device):
    """Trainer(bf16=True, torch_compile=True): the casts to autocast's dtype trace into the one
    graph, and the compiled model computes what the uncompiled one does."""
    model = llama(device, IMPL)
    ids, mask, _ = padded_batch(device)
    compiled, graphs = compile_fullgraph(model)
    with torch.autocast(device, dtype=torch.bfloat16):
        ref = model(ids, attention_mask=mask).logits
        logits = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, ref)  # bf16's default tolerance: same ops, same order
    assert_one_graph_calling_the_kernels(graphs, model)


def test_torch_compile_fullgraph_training_with_attention_dropout(device, monkeypatch):
    """A whole model training with attention dropout (GPT-2, attn_pdrop 0.1, train mode)
    compiles into one graph: the kernels' seed is drawn as a tensor (no .item()), and the
    compiled step gives eager's loss and gradients for the same torch.manual_seed. (Eagerly on
    a GPU the key comes from the generator's Philox offset, with no launch: the eager step here
    draws it as the compiled graph does, op._graph_seed.)"""
    monkeypatch.setattr(op, "_new_seed", op._graph_seed)
    model = gpt2(device, IMPL, attn_pdrop=0.1).train()
    ids, _, _ = padded_batch(device)

    def step(forward):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = forward(ids).logits.float().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = step(model)
    compiled, graphs = compile_fullgraph(model)
    loss, grads = step(compiled)
    assert_one_graph_calling_the_kernels(graphs, model)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)


def test_compiled_static_cache_decode_steps(device, kernel_calls):
    """Decoding as generate does it with cache_implementation="static" and a compiled forward
    (the set-up CUDA graphs need): left-padded prompts prefilled eagerly, then decode steps
    through a fullgraph compile: every graph calls the kernels in every layer (no break, no
    fallback) and the logits equal eager attention's."""
    import inspect

    from transformers import StaticCache

    model = llama(device)
    ids, mask = left_padded_prompts(device)
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name warns)
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )

    def decode(forward, steps=3):
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps)
        prompt = torch.arange(ids.shape[1], device=device)
        out = model(ids, attention_mask=mask, cache_position=prompt, **{cache_kw: cache})
        token, attention, logits = out.logits[:, -1:].argmax(-1), mask, []
        for step in range(steps):
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            position = torch.tensor([ids.shape[1] + step], device=device)
            out = forward(
                input_ids=token,
                attention_mask=attention,
                cache_position=position,
                **{cache_kw: cache},
            )
            token = out.logits[:, -1:].argmax(-1)
            logits.append(out.logits)
        return torch.cat(logits, dim=1)

    with torch.no_grad():
        ref = decode(model)
        model.set_attn_implementation(IMPL)
        compiled, graphs = compile_fullgraph(model)
        got = decode(compiled)
    torch.testing.assert_close(got, ref, **TOL)
    layers = model.config.num_hidden_layers
    assert graphs and all(g.code.count("hf_flashattn.fwd") == layers for g in graphs)
    assert len(kernel_calls) >= 2 * layers  # the prefill, then at least one traced step


@pytest.mark.slow
def test_torch_compile_inductor(device):
    """The default backend (inductor; C++ codegen on the CPU: about 40 s on 2 cores, cold)."""
    model = llama(device, IMPL)
    ids, mask, _ = padded_batch(device)
    ref = model(ids, attention_mask=mask).logits
    torch._dynamo.reset()
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, ref, **TOL)


# ---------------------------------------------------------------------------- mask function
def _dense(form, q_len, k_len, device):
    """The boolean (batch, 1, q, k) pattern a mask-function result means to a causal module."""
    q = torch.empty(1, 1, q_len, 1, device=device)
    k = torch.empty(1, 1, k_len, 1, device=device)
    additive = integration._additive_mask(form, True, q, k, None)
    return (
        torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
        if additive is None
        else additive == 0
    )


PADDING = torch.tensor(
    [[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool
)
PADDING_RIGHT = torch.arange(10) < torch.tensor([[10], [7], [1]])  # a padding collator's
# The extra arguments transformers' create_causal_mask / create_bidirectional_mask /
# create_sliding_window_causal_mask (and their bidirectional and chunked kin) pass.
CAUSAL = {"allow_is_causal_skip": True}
BIDIRECTIONAL = {"allow_is_causal_skip": False, "allow_is_bidirectional_skip": True}
OVERLAID = {"allow_is_causal_skip": False}  # or/and mask functions, packed sequences


def window(size, skips=CAUSAL):
    return {"local_size": size, **skips}


LEFT_PADS = torch.tensor([2, 0])  # PADDING's leading pads, as create_chunked_causal_mask counts
SLIDING = sliding_window_causal_mask_function
SLIDING_BIDIRECTIONAL = sliding_window_bidirectional_mask_function
MASK_CASES = {
    # name: (q_length, kv_length, q_offset, padding, mask_function, extra arguments, form)
    "prefill, unpadded": (6, 6, 0, None, causal_mask_function, CAUSAL, "none"),
    "prefill, padded": (10, 10, 0, PADDING, causal_mask_function, CAUSAL, "2d"),
    "dynamic-cache decode": (1, 10, 9, PADDING, causal_mask_function, CAUSAL, "2d"),
    "dynamic-cache chunk": (3, 10, 7, PADDING, causal_mask_function, CAUSAL, "2d"),
    "static-cache prefill": (4, 10, 0, PADDING[:, :4], causal_mask_function, CAUSAL, "2d short"),
    "static-cache prefill, unpadded": (4, 10, 0, None, causal_mask_function, CAUSAL, "2d short"),
    "static-cache decode": (1, 10, torch.tensor(5), PADDING[:, :6], causal_mask_function, CAUSAL)
    + ("2d",),
    "bidirectional": (5, 10, 0, PADDING, bidirectional_mask_function, BIDIRECTIONAL, "key padding"),
    "bidirectional, unpadded": (5, 10, 0, None, bidirectional_mask_function, BIDIRECTIONAL)
    + ("key padding",),
    "sliding window": (10, 10, 0, PADDING, SLIDING(3), window(3), "4d"),
    "sliding window covering the keys": (10, 10, 0, PADDING, SLIDING(11), window(11), "2d"),
    "sliding window covering, unpadded": (6, 6, 0, None, SLIDING(11), window(11), "none"),
    "sliding window covering, decoding": (1, 10, 9, PADDING, SLIDING(11), window(11), "2d"),
    "sliding window covering, overlaid": (
        10,
        10,
        0,
        PADDING,
        SLIDING(11),
        window(11, OVERLAID),
        "4d",
    ),
    # sdpa_mask's own rule (kv_length < local_size) is one key short of exact here
    "sliding window as wide as the keys": (10, 10, 0, PADDING, SLIDING(10), window(10), "4d"),
    "bidirectional sliding window": (5, 10, 0, PADDING, SLIDING_BIDIRECTIONAL(3))
    + (window(3, BIDIRECTIONAL), "4d"),
    "bidirectional sliding window covering the keys": (5, 10, 0, PADDING)
    + (SLIDING_BIDIRECTIONAL(11), window(11, BIDIRECTIONAL), "key padding"),
    "chunks covering the keys": (10, 10, 0, PADDING, chunked_causal_mask_function(11, LEFT_PADS))
    + (window(11), "2d"),
}


@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_function_is_cheap_and_means_what_sdpa_mask_means(case):
    # Pure mask semantics, on the CPU everywhere: the chunked cases' mask functions close over
    # CPU tensors (their left padding), which transformers indexes with the mask's device.
    device = "cpu"
    q_len, k_len, q_offset, padding, mask_function, extra, expected = MASK_CASES[case]
    padding = None if padding is None else padding.to(device)
    args = dict(
        batch_size=2,
        q_length=q_len,
        kv_length=k_len,
        q_offset=q_offset,
        kv_offset=0,
        mask_function=mask_function,
        attention_mask=padding,
        device=device,
    )
    form = integration.attention_mask(**args, **extra, dtype=torch.float32)
    kind = (
        "none"
        if form is None
        else ("2d short" if form.shape[-1] < k_len else "2d")
        if form.dim() == 2
        else "key padding"
        if form.shape[-2] == 1
        else "4d"
    )
    assert kind == expected
    want = sdpa_mask(**args, local_size=extra.get("local_size"), allow_is_causal_skip=False)
    want = want.expand(2, 1, q_len, k_len)
    assert torch.equal(_dense(form, q_len, k_len, device).expand(2, 1, q_len, k_len), want)


# ---------------------------------------------------------------------------- 4-D masks
def _eager_style(padding, q_len, k_len, q_offset=0):
    mask = eager_mask(
        batch_size=padding.shape[0],
        q_length=q_len,
        kv_length=k_len,
        q_offset=q_offset,
        attention_mask=padding,
        dtype=torch.float32,
        device=padding.device,
    )
    return mask


def test_4d_causal_padding_mask_is_understood(device):
    padding = PADDING.to(device)
    km = kernel_mask(_eager_style(padding, 10, 10), False, 10, 10)
    assert km.causal and km.kv_len == 10 and torch.equal(km.key_padding_mask, padding)
    km = kernel_mask(_eager_style(padding, 10, 10) == 0, False, 10, 10)  # bool form
    assert km.causal and torch.equal(km.key_padding_mask, padding)


def test_4d_mask_right_padded_everywhere_keeps_all_keys(device):
    """The last key is padding in every row: it is seen by no query, yet not a cache slot."""
    padding = torch.ones(2, 6, dtype=torch.bool, device=device)
    padding[:, -1] = False
    km = kernel_mask(_eager_style(padding, 6, 6), False, 6, 6)
    assert km.causal and km.kv_len == 6 and torch.equal(km.key_padding_mask, padding)


def test_4d_static_cache_mask_drops_unused_slots(device):
    padding = PADDING[:, :4].to(device)
    km = kernel_mask(_eager_style(padding, 4, 10), True, 4, 10)
    assert km.causal and km.kv_len == 4 and torch.equal(km.key_padding_mask, padding)


def test_4d_key_padding_only(device):
    padding = PADDING.to(device)
    additive = torch.zeros(2, 1, 1, 10, device=device).masked_fill(
        ~padding[:, None, None], torch.finfo(torch.float32).min
    )
    km = kernel_mask(additive, True, 5, 10)
    assert not km.causal and torch.equal(km.key_padding_mask, padding)
    unpadded = kernel_mask(torch.zeros(1, 1, 5, 10, device=device), True, 5, 10)
    assert unpadded == KernelMask(None, False, 10)


def test_4d_masks_the_kernels_cannot_take(device):
    padding = PADDING.to(device)
    biased = _eager_style(padding, 10, 10) - 0.5 * torch.rand(10, 10, device=device)
    assert kernel_mask(biased, True, 10, 10) is None
    per_head = (_eager_style(padding, 10, 10) == 0).expand(2, 2, 10, 10).clone()
    per_head[:, 1, :, 0] = False
    assert kernel_mask(per_head, True, 10, 10) is None
    sliding = sdpa_mask(
        batch_size=2,
        q_length=10,
        kv_length=10,
        mask_function=sliding_window_causal_mask_function(3),
        attention_mask=padding,
        allow_is_causal_skip=False,
        device=device,
    )
    assert kernel_mask(sliding, True, 10, 10) is None


def test_4d_analysis_is_memoised_per_mask_tensor(device):
    mask = _eager_style(PADDING.to(device), 10, 10)
    first = kernel_mask(mask, True, 10, 10)
    assert kernel_mask(mask, True, 10, 10) is first
    mask[:, :, :, 5] = 0.5  # an in-place edit must be seen
    assert kernel_mask(mask, True, 10, 10) is None


def test_4d_bool_key_padding_is_known_from_its_shape(device):
    """A (batch, 1, 1, k) bool mask is key padding whatever its values: compiled, kernel_mask
    reads none of them (fullgraph would fail on a data-dependent branch)."""
    padding = PADDING.to(device)
    km = kernel_mask(padding[:, None, None, :], True, 5, 10)
    assert not km.causal and km.kv_len == 10 and torch.equal(km.key_padding_mask, padding)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda m: kernel_mask(m, True, 5, 10).key_padding_mask, backend="eager", fullgraph=True
    )
    assert torch.equal(compiled(padding[:, None, None, :]), padding)


@pytest.mark.parametrize("form", ["bool", "additive"])
def test_4d_analysis_memo_keeps_only_a_copy_of_the_padding_row(form, device):
    """Once the forward drops its (batch, 1, q, k) mask, nothing of that size stays allocated:
    the memo keeps a compact copy of the padding row, never a view into the mask (or into the
    bool mask made from an additive one)."""
    mask = _eager_style(PADDING.to(device), 10, 10)
    if form == "bool":
        mask = mask == 0
    storage = weakref.ref(mask.untyped_storage())
    km = kernel_mask(mask, True, 10, 10)
    assert km.causal and torch.equal(km.key_padding_mask, PADDING.to(device))
    kept = integration._analyses[-1][5].key_padding_mask
    assert kept.untyped_storage().nbytes() == PADDING.numel()  # bool: a byte per key
    del mask, km
    assert storage() is None


def test_each_of_a_forwards_right_padded_masks_keeps_its_lengths(device):
    """Models with sliding-window and full layers make two masks per forward: the layers of
    each still find their rows' lengths. Left padding and decoding steps keep the mask."""
    padding = PADDING_RIGHT.to(device)
    masks = [integration.attention_mask(3, 10, 10, attention_mask=padding) for _ in range(2)]
    assert masks[0] is not masks[1]
    for mask in masks * 2:
        assert kernel_mask(mask, True, 10, 10).key_lengths.tolist() == [10, 7, 1]
    left = integration.attention_mask(3, 10, 10, attention_mask=padding.flip(-1))
    assert kernel_mask(left, True, 10, 10).key_lengths is None  # not a prefix: the mask
    # a decoding step (one query, a cache of 10): the split-KV kernel reads the mask anyway
    step = integration.attention_mask(3, 1, 10, q_offset=9, attention_mask=padding)
    assert kernel_mask(step, True, 1, 10).key_lengths is None


# ---------------------------------------------------------------------------- fallbacks
def _assert_one_warning(caught, reason):
    messages = fallback_messages(caught)
    assert len(messages) == 1 and support.FALLBACK_REASONS[reason] in messages[0], messages


def _assert_falls_back(model, ids, attention_mask, reason, caught, kernel_calls):
    """``model`` (built with eager attention), switched to triton_attention, still runs eager
    for ``reason``: the same logits bit for bit, twice, no kernel call, and a single warning."""
    ref = model(ids, attention_mask=attention_mask).logits
    model.set_attn_implementation(IMPL)
    for _ in range(2):
        assert_equal(model(ids, attention_mask=attention_mask).logits, ref)
    assert not kernel_calls
    _assert_one_warning(caught, reason)


@pytest.mark.parametrize("family", MODELS)
def test_fallback_output_attentions(family, device, fresh_warnings, kernel_calls):
    model = MODELS[family](device)
    ids, mask, _ = padded_batch(device)
    ref = model(ids, attention_mask=mask, output_attentions=True)
    model.set_attn_implementation(IMPL)
    for _ in range(2):
        out = model(ids, attention_mask=mask, output_attentions=True)
        assert_equal(out.logits, ref.logits)
        assert len(out.attentions) == model.config.num_hidden_layers
        for a, b in zip(out.attentions, ref.attentions, strict=True):
            assert_equal(a, b)
    assert not kernel_calls
    _assert_one_warning(fresh_warnings, "output_attentions")


def test_fallback_arbitrary_additive_mask(device, fresh_warnings, kernel_calls):
    model = llama(device)
    ids, mask, _ = padded_batch(device)
    torch.manual_seed(3)
    # Padding and causality, plus a real bias.
    bias = _eager_style(mask.bool(), 8, 8) - torch.rand(8, 8, device=device)
    _assert_falls_back(model, ids, bias, "mask", fresh_warnings, kernel_calls)


def test_a_4d_padding_mask_from_the_user_runs_the_kernels(device, fresh_warnings, kernel_calls):
    model = llama(device)
    ids, mask, _ = padded_batch(device)
    additive = _eager_style(mask.bool(), 8, 8)
    ref = model(ids, attention_mask=additive).logits
    model.set_attn_implementation(IMPL)
    out = model(ids, attention_mask=additive).logits
    assert len(kernel_calls) == model.config.num_hidden_layers
    assert not fallback_messages(fresh_warnings)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **TOL)


def _large_heads(device, monkeypatch):
    return llama(device, head_dim=264)


def _float64(device, monkeypatch):
    return llama(device).double()


def _cpu_without_interpreter(device, monkeypatch):
    # On the CPU whatever the machine has: without the interpreter (a GPU machine never turns it
    # on) CPU tensors are what the 'device' reason is about.
    monkeypatch.setattr(support, "INTERPRETING", False)
    return llama("cpu")


@pytest.mark.parametrize(
    "reason, build",
    [("head_size", _large_heads), ("dtype", _float64), ("device", _cpu_without_interpreter)],
)
def test_fallback_model_level(reason, build, device, monkeypatch, fresh_warnings, kernel_calls):
    model = build(device, monkeypatch)
    ids, mask, _ = padded_batch(model.device)
    _assert_falls_back(model, ids, mask, reason, fresh_warnings, kernel_calls)


@pytest.mark.parametrize("padded", [True, False])
def test_sliding_window_narrower_than_the_keys_runs_the_kernels(device, padded, kernel_calls):
    """Mistral with a 3-key window over 8 tokens: transformers' windowed (q, k) mask is matched
    as key padding + causal within the module's window, and the kernels serve every layer with
    it: logits and gradients as eager's at the real tokens (left and right padded rows)."""
    ids, mask, labels = padded_batch(device)
    if not padded:
        mask = torch.ones_like(mask)
    model = mistral(device, sliding_window=3)
    ours, ref = step_against_eager(model, IMPL, ids, mask, labels)

    assert len(kernel_calls) == model.config.num_hidden_layers  # every layer, no fallback
    assert all(c["sliding_window"] == 3 and c["causal"] for c in kernel_calls)
    assert_step_matches(ours, ref, mask)


def test_greedy_generate_with_a_sliding_window_matches_eager(device, kernel_calls):
    """Mistral with a 3-key window, left-padded 6-token prompts: the prefill runs the kernels
    with the window, and so does every decoding step however transformers' cache keeps the
    window's keys; the tokens equal eager's."""
    model = mistral(device, sliding_window=3)
    ids, mask = left_padded_prompts(device)
    out, ref = greedy_against_eager(model, IMPL, ids, mask)

    assert len(kernel_calls) == 4 * model.config.num_hidden_layers  # prefill + 3 decode steps
    assert kernel_calls[0]["sliding_window"] == 3  # the prefill's keys pass the window
    assert torch.equal(out, ref)


def test_sliding_window_covering_the_keys_runs_plain_causal(device, kernel_calls):
    """A window as wide as every key changes nothing: the kernels run without one."""
    ids, mask, _ = padded_batch(device)
    wide = mistral(device, sliding_window=16)
    ref = wide(ids, attention_mask=mask).logits
    wide.set_attn_implementation(IMPL)
    torch.testing.assert_close(
        wide(ids, attention_mask=mask).logits[mask.bool()], ref[mask.bool()], **TOL
    )
    assert kernel_calls and all(c["sliding_window"] is None for c in kernel_calls)


@pytest.mark.parametrize("padded", [True, False])
def test_bidirectional_sliding_window_runs_the_kernels(device, padded, kernel_calls):
    """ModernBERT's local layers (keys at most 2 away on either side, over 8 tokens):
    transformers' bidirectional windowed mask is matched as key padding within the module's
    window, and the kernels serve every layer, the local ones with the window and causal=False:
    logits and gradients as eager's at the real tokens."""
    ids, mask, labels = padded_batch(device)
    if not padded:
        mask = torch.ones_like(mask)
    model = modernbert(device)
    ours, ref = step_against_eager(model, IMPL, ids, mask, labels)

    assert len(kernel_calls) == model.config.num_hidden_layers  # every layer, no fallback
    windows = [c["sliding_window"] for c in kernel_calls]
    assert windows == [None, 3, 3] and not any(c["causal"] for c in kernel_calls), kernel_calls
    assert_step_matches(ours, ref, mask)


def test_sliding_window_read_from_kwargs_instance_class_or_property():
    """Where models keep their window: the call's kwargs first, else the module's attribute,
    set on the instance, on its class, or computed by a property; None without one."""

    class Plain(torch.nn.Module):
        pass

    class OnClass(torch.nn.Module):
        sliding_window = 8

    class ByProperty(torch.nn.Module):
        @property
        def sliding_window(self):
            return 9

    on_instance = Plain()
    on_instance.sliding_window = 7
    assert support.sliding_window(Plain(), {}) is None
    assert support.sliding_window(on_instance, {}) == 7
    assert support.sliding_window(OnClass(), {}) == 8
    assert support.sliding_window(ByProperty(), {}) == 9
    assert support.sliding_window(OnClass(), {"sliding_window": 5}) == 5


@pytest.mark.parametrize(
    "reason, kwargs",
    [
        ("position_bias", {"position_bias": torch.zeros(1, 4, 5, 5)}),
    ],
)
def test_fallback_call_level(reason, kwargs, device, fresh_warnings, kernel_calls):
    """Arguments only some models pass: the model's own eager function gets them."""
    module = llama(device).model.layers[0].self_attn
    torch.manual_seed(4)
    q = torch.randn(2, 4, 5, 16, device=device)
    k, v = torch.randn(2, 2, 5, 16, device=device), torch.randn(2, 2, 5, 16, device=device)
    causal = _eager_style(torch.ones(2, 5, dtype=torch.bool, device=device), 5, 5)
    ref, _ = modeling_llama.eager_attention_forward(module, q, k, v, causal, scaling=0.25, **kwargs)
    for _ in range(2):
        out, _ = integration.attention_forward(module, q, k, v, None, scaling=0.25, **kwargs)
        assert_equal(out, ref)
    assert not kernel_calls
    _assert_one_warning(fresh_warnings, reason)


# ---------------------------------------------------------------------------- autocast
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _record_kernel_dtypes(monkeypatch) -> list[tuple[torch.dtype, ...]]:
    """The (q, k, v) dtypes of each flash_attn call the integration makes from here on."""
    dtypes = []
    inner = integration.flash_attn

    def recording(q, k, v, **kwargs):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return inner(q, k, v, **kwargs)

    monkeypatch.setattr(integration, "flash_attn", recording)
    return dtypes


def test_mixed_dtypes_run_eager_outside_autocast_and_the_kernels_under_it(
    device, monkeypatch, fresh_warnings, kernel_calls
):
    """float32 q/k with a bf16 v (rotary embeddings on float32 weights under autocast): outside
    autocast a real mismatch, so eager runs; under autocast all three are cast to its dtype,
    as sdpa's inputs are, and so is the output."""
    module = llama(device).model.layers[0].self_attn
    torch.manual_seed(4)
    q, k = torch.randn(2, 4, 5, 16, device=device), torch.randn(2, 2, 5, 16, device=device)
    v = torch.randn(2, 2, 5, 16, device=device, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):  # eager's own matmul refuses the mix
        integration.attention_forward(module, q, k, v, None, scaling=0.25)
    assert not kernel_calls
    _assert_one_warning(fresh_warnings, "dtype")
    dtypes = _record_kernel_dtypes(monkeypatch)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, _ = integration.attention_forward(module, q, k, v, None, scaling=0.25)
    assert dtypes == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES.values(), ids=AUTOCAST_DTYPES.keys())
def test_autocast_float32_weights_run_the_kernels_in_every_layer(
    dtype, device, monkeypatch, fresh_warnings, kernel_calls
):
    """float32 weights under autocast: every layer runs the kernels in the autocast dtype, and
    logits at real positions and each token's loss are within twice the error of eager's and
    of sdpa's under the same autocast, against the float32 model without autocast
    (test_integration_gpu.py's rule). In the interpreter bf16 is computed in float32."""
    model = llama(device)
    ids, mask, labels = padded_batch(device)
    real = mask.bool()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        torch_logits = {}
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            with torch.autocast(device, dtype=dtype):
                torch_logits[impl] = model(ids, attention_mask=mask).logits
        assert not kernel_calls
        model.set_attn_implementation(IMPL)
        dtypes = _record_kernel_dtypes(monkeypatch)
        with torch.autocast(device, dtype=dtype):
            logits = model(ids, attention_mask=mask).logits

    assert dtypes == [(dtype,) * 3] * model.config.num_hidden_layers
    assert not fallback_messages(fresh_warnings)
    assert_within_torch_error(
        "logits", logits[real], ref[real], {i: x[real] for i, x in torch_logits.items()}
    )
    assert_within_torch_error(
        "token losses",
        token_losses(logits, labels),
        token_losses(ref, labels),
        {i: token_losses(x, labels) for i, x in torch_logits.items()},
    )


@pytest.mark.parametrize(
    "precision",
    # Trainer(fp16=True) needs a GPU: on the CPU it quietly trains in float32, no autocast
    ["bf16", pytest.param("fp16", marks=pytest.mark.gpu)],
)
def test_trainer_mixed_precision_on_float32_weights_runs_the_kernels(
    precision, device, tmp_path, monkeypatch, fresh_warnings, kernel_calls
):
    """Trainer(bf16=True) / (fp16=True) keeps float32 weights and runs forwards under autocast:
    every step runs the kernels in every layer, in the autocast dtype."""
    from transformers import Trainer, TrainingArguments

    model = llama(device, IMPL).train()
    ids, mask, labels = padded_batch("cpu")
    rows = [
        {"input_ids": i, "attention_mask": a, "labels": y}
        for i, a, y in zip(ids, mask, labels, strict=True)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=len(rows),
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        **{precision: True},
    )
    # One process on one GPU: with several visible, Trainer wraps the model in nn.DataParallel,
    # whose replica threads (seen on 2 GPUs, torch 2.11) ran without autocast, so no layer
    # received the autocast dtype whatever the attention implementation.
    _ = args.device  # sets up the devices first, which also sets _n_gpu
    args._n_gpu = min(args._n_gpu, 1)
    dtypes = _record_kernel_dtypes(monkeypatch)
    Trainer(model=model, args=args, train_dataset=rows).train()

    layers = model.config.num_hidden_layers
    assert dtypes == [(AUTOCAST_DTYPES[precision],) * 3] * (2 * layers)
    assert not fallback_messages(fresh_warnings)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------- private APIs
def test_support_imports_without_transformers_output_capturing(monkeypatch):
    """transformers.utils.output_capturing is private: a release without it must not stop the
    import, and output_attentions=True still sends the call to eager."""
    import transformers.utils

    monkeypatch.delattr(transformers.utils, "output_capturing", raising=False)
    monkeypatch.setitem(sys.modules, "transformers.utils.output_capturing", None)
    spec = importlib.util.spec_from_file_location(
        "hf_flashattn._support_without_output_capturing", support.__file__
    )
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert not probe._attentions_requested({})
    assert probe._attentions_requested({"output_attentions": True})
