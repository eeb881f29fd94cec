"""Packed sequences: several sequences along one row, each attending only within itself.

The op (``flash_attn(cu_seqlens=...)``) against the reference, its argument checks, the
boundaries read from position_ids, and the transformers integration: a packed row gives every
sequence what it gets alone, on the kernels, with no (seq x seq) mask.
"""

import warnings

import pytest
import torch
from attention_ref import assert_close_to_ref, attention_ref
from test_op import FLOOR, _check, _inputs
from tiny_models import gpt2, llama

from hf_flashattn import flash_attn, integration, op
from hf_flashattn.op import _new_seed, applied_dropout_rate, dropout_keep_mask
from hf_flashattn.packing import cu_seqlens_from_position_ids, token_bounds


def _cu(lengths, device, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=device)


# Lengths crossing block edges of both the interpreter's 64-row blocks and the GPU's 128, a
# one-token sequence, and an empty one (a repeated boundary).
LENGTHS = [70, 1, 0, 130, 29]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "dtype,heads_q,heads_kv,head_dim",
    [(torch.float16, 4, 2, 64), (torch.bfloat16, 3, 1, 128), (torch.float32, 2, 2, 40)],
)
def test_packed_rows_match_each_sequence_alone(device, causal, dtype, heads_q, heads_kv, head_dim):
    q, k, v = _inputs(device, dtype, 1, heads_q, heads_kv, sum(LENGTHS), sum(LENGTHS), head_dim)
    _check(device, dtype, q, k, v, causal=causal, cu_seqlens=_cu(LENGTHS, device))


def test_one_row_of_boundaries_serves_every_batch_row(device):
    """(n + 1,) boundaries with batch > 1: every row is packed the same way (the kernels once
    stepped past the one row of token bounds for the second batch row and read memory beyond
    it: wrong sequences, or a crash under the interpreter)."""
    lengths = [40, 1, 88]
    q, k, v = _inputs(device, torch.float16, 3, 2, 2, sum(lengths), sum(lengths), 64)
    _check(device, torch.float16, q, k, v, causal=True, cu_seqlens=_cu(lengths, device))


def test_boundaries_per_batch_row_and_bshd_layout(device):
    """(batch, n + 1) boundaries, rows with different counts (the shorter repeats its end);
    the bshd layout; int64 boundaries."""
    seqlen = 150
    cu = torch.tensor([[0, 60, 61, 150, 150], [0, 150, 150, 150, 150]], device=device)
    # bhsd-shaped views of (batch, seq, heads, dim) memory, handed over in the bshd layout
    q, k, v = _inputs(device, torch.float16, 2, 4, 2, seqlen, seqlen, 64, layout="bshd")
    bshd = (t.transpose(1, 2) for t in (q, k, v))
    out = flash_attn(*bshd, causal=True, cu_seqlens=cu, layout="bshd")
    ref, _ = attention_ref(q, k, v, causal=True, cu_seqlens=cu)
    lowp, _ = attention_ref(q, k, v, causal=True, cu_seqlens=cu, upcast=False)
    assert_close_to_ref("out", out.transpose(1, 2), ref, lowp, FLOOR[torch.float16])


def test_packed_rows_with_dropout_use_the_kernels_own_mask(device):
    """Dropout inside packed rows: the output and gradients equal the reference under the
    keep-mask the kernels draw (the same draws as unpacked: one per (row, column))."""
    lengths = [40, 57, 31]
    seqlen, p = sum(lengths), 0.2
    cu = _cu(lengths, device)
    q, k, v = _inputs(device, torch.float32, 1, 2, 1, seqlen, seqlen, 32)
    torch.manual_seed(7)
    out = flash_attn(q, k, v, causal=True, dropout_p=p, cu_seqlens=cu)
    torch.manual_seed(7)
    keep = dropout_keep_mask(_new_seed(torch.device(device)), 1, 2, seqlen, seqlen, p, device)
    applied = applied_dropout_rate(p)  # 51/256: the kernels scale by its 1 / (1 - p)
    ref, _ = attention_ref(
        q, k, v, causal=True, cu_seqlens=cu, dropout_keep=keep, dropout_p=applied
    )
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for ours, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "lengths",
    # sequence edges inside blocks; sequences starting on block edges, whose inner blocks need
    # no mask; one sequence (a plain causal row, as compiled models without a cache pass it)
    [[3, 200, 61], [128, 300, 40], [468]],
    ids=["unaligned", "aligned", "one"],
)
@pytest.mark.parametrize("max_dim", [64, 128, 256])
def test_packed_rows_with_the_gpu_block_configs(device, max_dim, lengths):
    """The GPU tables' block shapes (BLOCK_M / BLOCK_N up to 128), forced through whichever
    backend is here: a sequence edge inside a block, blocks spanning several sequences, blocks
    inside one sequence."""
    from hf_flashattn.kernels.configs import gpu_configs

    configs = {name: cfg for name, cfg in gpu_configs()[max_dim].items() if name != "decode"}
    with op.forced_configs(**configs):
        q, k, v = _inputs(device, torch.float16, 1, 2, 1, sum(lengths), sum(lengths), 64)
        _check(device, torch.float16, q, k, v, causal=True, cu_seqlens=_cu(lengths, device))


@pytest.mark.parametrize(
    "cu_seqlens,kwargs,error,match",
    [
        ([0, 3, 8], {}, ValueError, "from 0 to seq_len"),
        ([1, 3, 10], {}, ValueError, "from 0 to seq_len"),
        ([0, 6, 3, 10], {}, ValueError, "non-decreasing"),
        ([[0, 10]] * 3, {}, ValueError, "rows but the batch is 2"),
        ([0.0, 10.0], {}, TypeError, "int32 or int64"),
        ([0, 10], {"key_padding_mask": True}, ValueError, "not both"),
        ([0, 10], {"seqlen_k": 12}, ValueError, "seq_q must equal seq_k"),
    ],
)
def test_bad_boundaries_are_refused_by_name(device, cu_seqlens, kwargs, error, match):
    seqlen_k = kwargs.pop("seqlen_k", 10)
    q, k, v = _inputs(device, torch.float16, 2, 2, 2, 10, seqlen_k, 32)
    if kwargs.pop("key_padding_mask", False):
        kwargs["key_padding_mask"] = torch.ones(2, seqlen_k, dtype=torch.bool, device=device)
    cu = torch.tensor(cu_seqlens, device=device)
    with pytest.raises(error, match=match) as info:
        flash_attn(q, k, v, causal=True, cu_seqlens=cu, **kwargs)
    assert "cu_seqlens" in str(info.value)


def test_boundaries_from_position_ids():
    """A sequence starts wherever the position does not follow the previous one by 1: restarts
    at 0, a jump; a row that is one sequence starting past 0 (a continuation) stays one."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [7, 8, 9, 10, 11, 12, 13, 14]])
    cu = cu_seqlens_from_position_ids(position_ids)
    assert cu.tolist() == [[0, 3, 5, 6, 8, 8, 8, 8, 8], [0] + [8] * 8]
    bounds = token_bounds(cu, 8)
    assert bounds[0].tolist() == [[0, 0, 0, 3, 3, 5, 6, 6], [3, 3, 3, 5, 5, 6, 8, 8]]
    assert bounds[1].tolist() == [[0] * 8, [8] * 8]


# ---------------------------------------------------------------------------- transformers
def _packed_batch(vocab, lengths, device):
    torch.manual_seed(3)
    sequences = [torch.randint(3, vocab, (1, n), device=device) for n in lengths]
    position_ids = torch.cat([torch.arange(n, device=device)[None] for n in lengths], dim=1)
    return sequences, torch.cat(sequences, dim=1), position_ids


@pytest.mark.parametrize("build", [llama, gpt2])
def test_a_packed_row_gives_each_sequence_what_it_gets_alone(
    device, build, kernel_calls, monkeypatch
):
    """Training-style call (no cache, position_ids restarting): logits and every parameter's
    gradient of the packed row equal those of the sequences run one by one with eager
    attention; every layer runs the kernels, with the boundaries (converted once), no
    fallback warning."""
    from hf_flashattn import packing

    conversions = []
    token_bounds = packing.token_bounds
    monkeypatch.setattr(
        packing, "token_bounds", lambda *a: conversions.append(a) or token_bounds(*a)
    )
    model = build(device)
    lengths = [5, 9, 1, 7]
    sequences, ids, position_ids = _packed_batch(model.config.vocab_size, lengths, device)

    model.zero_grad(set_to_none=True)
    alone = [model(s, use_cache=False).logits for s in sequences]
    torch.cat(alone, dim=1).float().square().mean().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.set_attn_implementation("triton_attention")
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", integration.EagerFallbackWarning)
        logits = model(ids, position_ids=position_ids, use_cache=False).logits
    logits.float().square().mean().backward()

    torch.testing.assert_close(logits, torch.cat(alone, dim=1), atol=1e-4, rtol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], atol=1e-4, rtol=1e-4)
    assert len(kernel_calls) == model.config.num_hidden_layers
    for call in kernel_calls:
        assert call["cu_seqlens"].tolist() == [[0, 5, 14, 15, 22] + [22] * 18]
        # one object for every layer: its token bounds are computed once per forward
        assert call["cu_seqlens"] is kernel_calls[0]["cu_seqlens"]
    assert len(conversions) == 1


def test_flash_attention_kwargs_pack_without_position_ids(device, kernel_calls):
    """``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``'s keywords, both spellings
    of the maximum lengths: the boundaries reach the kernels even without position_ids."""
    model = llama(device, "triton_attention")
    lengths = [6, 2, 8]
    sequences, ids, _ = _packed_batch(model.config.vocab_size, lengths, device)
    cu = _cu(lengths, device)
    with torch.no_grad():
        alone = torch.cat([model(s, use_cache=False).logits for s in sequences], dim=1)
        for lengths_kw in ("max_length", "max_seqlen"):
            kernel_calls.clear()
            logits = model(
                ids,
                use_cache=False,
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu.clone(),
                **{f"{lengths_kw}_q": 8, f"{lengths_kw}_k": 8},
            ).logits
            torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4)
            assert all(call["cu_seqlens"] is cu for call in kernel_calls), lengths_kw


def test_other_mask_patterns_are_not_taken_for_packing(device):
    """The mask function's pattern is checked pair by pair: causal with one extra hole (a key
    no query may see) is not packed sequences, so the full mask is built."""
    from transformers.masking_utils import and_masks, causal_mask_function

    def no_key_3(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx != 3

    mask = integration.attention_mask(
        1, 8, 8, mask_function=and_masks(causal_mask_function, no_key_3), device=device
    )
    assert mask.dim() == 4 and mask.shape[-2:] == (8, 8)
    assert not bool(mask[0, 0, 5, 3]) and bool(mask[0, 0, 5, 2])


def test_eager_fallback_sees_the_packed_sequences(device, monkeypatch):
    """output_attentions sends the call to eager attention, which gets the same packed mask
    as an additive (seq x seq) one: each sequence's weights stay within it."""
    monkeypatch.setattr(integration, "_warned", set())  # the reason is warned once per process
    model = llama(device, "triton_attention")
    lengths = [4, 6]
    sequences, ids, position_ids = _packed_batch(model.config.vocab_size, lengths, device)
    with torch.no_grad(), pytest.warns(integration.EagerFallbackWarning):
        out = model(ids, position_ids=position_ids, use_cache=False, output_attentions=True)
        alone = torch.cat([model(s, use_cache=False).logits for s in sequences], dim=1)
    torch.testing.assert_close(out.logits, alone, atol=1e-4, rtol=1e-4)
    weights = out.attentions[0]
    assert torch.all(weights[..., :4, 4:] == 0) and torch.all(weights[..., 4:, :4] == 0)


def test_windows_narrower_than_the_keys_skip_the_packing_check(device, monkeypatch):
    """A sliding window narrower than the keys runs eager whatever else the mask holds: the
    O(seq^2) packed-sequence check is not spent on it."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    checked = []
    monkeypatch.setattr(integration, "_packed_sequences", lambda *args: checked.append(args))
    window = sliding_window_causal_mask_function(4)
    mask = integration.attention_mask(1, 8, 8, mask_function=window, local_size=4, device=device)
    assert checked == [] and mask.shape[-2:] == (8, 8)
    covering = dict(local_size=9, allow_is_causal_skip=True, device=device)
    assert integration.attention_mask(1, 8, 8, mask_function=window, **covering) is None
    assert checked == []  # the window covers the keys: plain causal, known without a check


def test_packed_rows_of_a_batch_pack_differently(device, kernel_calls):
    """Two rows packed differently (5 + 9 + 6 and 12 + 8 tokens): each row gets its own
    boundaries, and every sequence of either row gives what it gives alone."""
    model = llama(device, "triton_attention")
    rows = [[5, 9, 6], [12, 8]]
    torch.manual_seed(5)
    vocab = model.config.vocab_size
    sequences = [[torch.randint(3, vocab, (1, n), device=device) for n in r] for r in rows]
    ids = torch.cat([torch.cat(row, dim=1) for row in sequences])
    position_ids = torch.stack(
        [torch.cat([torch.arange(n, device=device) for n in r]) for r in rows]
    )
    with torch.no_grad():
        logits = model(ids, position_ids=position_ids, use_cache=False).logits
        alone = torch.stack(
            [torch.cat([model(s, use_cache=False).logits[0] for s in row]) for row in sequences]
        )
    torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4)
    assert kernel_calls[0]["cu_seqlens"][:, :4].tolist() == [[0, 5, 14, 20], [0, 12, 20, 20]]


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
def test_compiled_forward_without_cache_runs_the_kernels(device, packed):
    """Compiled and without a cache (how models train), transformers hands every forward causal
    AND a packed-sequence mask, packed or not, since it cannot read position_ids either: one
    graph, every layer on the kernels (no eager fallback), each sequence as alone."""
    from test_integration import assert_one_graph_calling_the_kernels, compile_fullgraph

    model = llama(device)
    lengths = [9, 15] if packed else [24]
    sequences, ids, position_ids = _packed_batch(model.config.vocab_size, lengths, device)
    with torch.no_grad():
        alone = torch.cat([model(s, use_cache=False).logits for s in sequences], dim=1)
    model.set_attn_implementation("triton_attention")
    compiled, graphs = compile_fullgraph(model)
    logits = compiled(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4)
    assert_one_graph_calling_the_kernels(graphs, model)


def test_compiled_and_mask_that_is_not_packing_fails_loudly():
    """Compiled, the pattern cannot steer the host: a combined mask function is taken for
    packing and checked on the device, so a pattern that is not packing stops the run instead
    of attending wrongly (uncompiled, the same mask is built in full:
    test_other_mask_patterns_are_not_taken_for_packing). On the CPU only: on a GPU the failed
    check is a device-side assert, which leaves CUDA unusable for the rest of the process."""
    from transformers.masking_utils import and_masks, causal_mask_function

    def no_key_3(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx != 3

    mask_function = and_masks(causal_mask_function, no_key_3)
    torch._dynamo.reset()
    make_mask = torch.compile(
        lambda: integration.attention_mask(1, 8, 8, mask_function=mask_function, device="cpu"),
        backend="aot_eager",
        fullgraph=True,
    )
    with pytest.raises(RuntimeError, match="packed sequences"):
        make_mask()


def test_compiled_with_dynamic_shapes_packed_rows_of_any_length(device):
    """Compiled with dynamic shapes (packed batches change length every step): one graph
    serves rows of different lengths and packings (the model's scaling then arrives as a
    symbolic float), each sequence as alone."""
    model = llama(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for lengths in ([9, 15], [4, 20, 16]):
        sequences, ids, position_ids = _packed_batch(model.config.vocab_size, lengths, device)
        with torch.no_grad():
            model.set_attn_implementation("eager")
            alone = torch.cat([model(s, use_cache=False).logits for s in sequences], dim=1)
            model.set_attn_implementation("triton_attention")
            logits = compiled(ids, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4)
