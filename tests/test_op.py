"""flash_attn against a float64 (CPU) / float32 (GPU) reference on upcast inputs.

Tolerance: our error may be at most twice PyTorch's own low-precision attention's error on the
same inputs, plus a tiny floor (see DEVELOPERS.md). Fresh random inputs per test (no fixed
seed), outputs poisoned so unwritten elements show, NaN never passes.
"""

import pytest
import torch
from attention_ref import assert_close_to_ref, attention_ref, max_err

from hf_flashattn import flash_attn, op
from hf_flashattn.op import _new_seed, applied_dropout_rate, dropout_keep_mask

# fp32 on the GPU runs tf32x3 dots (fp32-accurate)
FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float32: 1e-5}


def _inputs(device, dtype, batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, layout="bhsd"):
    def make(heads, seqlen):
        if layout == "bshd":  # what transformers' projections give, transposed: a strided view
            return torch.randn(
                batch, seqlen, heads, head_dim, device=device, dtype=dtype
            ).transpose(1, 2)
        if layout == "sliced":  # last dim dense, head/seq strides with gaps
            full = torch.randn(batch, heads * 2, seqlen, head_dim + 8, device=device, dtype=dtype)
            return full[:, ::2, :, :head_dim]
        return torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype)

    q, k, v = make(heads_q, seqlen_q), make(heads_kv, seqlen_k), make(heads_kv, seqlen_k)
    return [t.requires_grad_() for t in (q, k, v)]


def _check(
    device, dtype, q, k, v, *, causal, key_padding_mask=None, scale=None, cu_seqlens=None,
    sliding_window=None, softcap=None, key_lengths=None,
):  # fmt: skip
    """Forward, LSE and all three gradients of flash_attn against the reference. key_lengths
    goes to flash_attn alone; the reference takes the mask it stands for."""
    kw = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale, cu_seqlens=cu_seqlens)
    kw.update(sliding_window=sliding_window, softcap=softcap)
    out, lse = flash_attn(q, k, v, return_lse=True, key_lengths=key_lengths, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    if key_lengths is not None:
        keys = torch.arange(k.shape[2], device=key_lengths.device)
        kw["key_padding_mask"] = keys < key_lengths[:, None]

    ref, lse_ref = attention_ref(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
    lowp, _ = attention_ref(q, k, v, upcast=False, **kw)
    lowp_grads = torch.autograd.grad(lowp, (q, k, v), dout)

    floor = FLOOR[dtype]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_to_ref("out", out, ref, lowp, floor)
    # LSE is float32 in both: compare with a float32-rounding bound; -inf rows must match
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), "lse: -inf rows differ"
    finite = torch.isfinite(lse_ref)
    assert max_err(lse[finite], lse_ref[finite]) <= 1e-4 * (1 + lse_ref[finite].abs().max().item())
    grads = zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, lowp_grads, strict=True)
    for name, ours, r, lp in grads:
        scale_g = max(1.0, r.abs().max().item())
        assert_close_to_ref(name, ours, r, lp, floor * 10 * scale_g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128])  # 80 and 96 in two chunks
@pytest.mark.parametrize("causal", [False, True])
def test_dtype_head_dim(device, dtype, head_dim, causal):
    q, k, v = _inputs(device, dtype, 2, 2, 2, 97, 130, head_dim)
    _check(device, dtype, q, k, v, causal=causal)


def test_head_dim_chunks_cover_the_head_dim_and_save():
    """Every head dim is tiled by one power-of-two chunk, or two where that is less than one
    padded chunk (96 = 64 + 32 instead of 128); never short of the head dim."""
    from hf_flashattn.kernels.configs import block_d, head_dim_chunks

    assert head_dim_chunks(96) == (64, 32) and head_dim_chunks(80) == (64, 16)
    assert head_dim_chunks(128) == (128, 0) and head_dim_chunks(112) == (128, 0)
    for head_dim in range(1, 257):
        first, second = head_dim_chunks(head_dim)
        padded = block_d(head_dim)
        assert first >= 16 and first & (first - 1) == 0
        if second:
            assert second >= 16 and second & (second - 1) == 0
            assert first < head_dim <= first + second < padded
        else:
            assert first == padded


@pytest.mark.parametrize(
    "seqlen_q,seqlen_k",
    [(1, 1), (17, 17), (128, 128), (257, 257), (1, 257), (17, 128), (257, 17), (128, 1)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_seq_lengths(device, seqlen_q, seqlen_k, causal):
    q, k, v = _inputs(device, torch.float16, 2, 2, 1, seqlen_q, seqlen_k, 64)
    _check(device, torch.float16, q, k, v, causal=causal)


@pytest.mark.parametrize("heads_q,heads_kv", [(3, 3), (6, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa(device, heads_q, heads_kv, causal):
    q, k, v = _inputs(device, torch.float16, 2, heads_q, heads_kv, 70, 140, 64)
    _check(device, torch.float16, q, k, v, causal=causal)


def test_dkdv_group_parts_reach_the_target_with_the_fewest_divisor():
    parts = op._dkdv_group_parts
    assert parts(3, 128, 264) == 3  # the LLaMA-0.5B layer on 132 SMs: 384 programs
    assert parts(8, 128, 264) == 4  # 2 gives 256, short of the target
    assert parts(8, 132, 264) == 2
    assert parts(6, 10, 10**9) == 6  # never past the group
    assert parts(4, 300, 264) == 1 and parts(1, 10, 264) == 1


@pytest.mark.parametrize("parts", [2, 4])  # half the group per program / one head each
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_group_shared_out_in_dkdv(device, monkeypatch, parts, causal):
    """The dK/dV pass with the GQA group's query heads shared out among programs (parts' float32
    sums added on the host): gradients as the reference's, with key padding, in k's strides."""
    chosen = []
    choose = op._dkdv_group_parts
    block_n = op._dkdv_config(64, 140).block_n  # the key block this machine launches
    blocks = -(-140 // block_n)
    target = parts * 2 * 2 * ((blocks + 1) // 2 if causal else blocks)  # batch 2 x 2 K/V heads
    monkeypatch.setattr(op, "_dkdv_target", lambda dev, warps, head_dim: target)
    monkeypatch.setattr(op, "_dkdv_group_parts", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    q, k, v = _inputs(device, torch.float16, 2, 8, 2, 70, 140, 64, layout="bshd")
    mask = torch.arange(140)[None, :] < torch.tensor([140, 97])[:, None]
    _check(device, torch.float16, q, k, v, causal=causal, key_padding_mask=mask.to(device))
    assert chosen and all(p == parts for p in chosen), chosen
    with torch.no_grad():
        out, lse = flash_attn(q, k, v, causal=causal, return_lse=True)
        args = (q, k, v, out, lse, torch.randn_like(out), None, None, None, causal, 0.125, 0.0)
        _, dk, dv = op._backward(*args, None, 0, 0.0)
    assert dk.stride() == k.stride() and dv.stride() == v.stride()


@pytest.mark.parametrize("layout", ["bshd", "sliced"])
def test_non_contiguous(device, layout):
    q, k, v = _inputs(device, torch.float16, 2, 4, 2, 65, 65, 64, layout=layout)
    assert not q.is_contiguous()
    _check(device, torch.float16, q, k, v, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(device, causal):
    seqlen_q, seqlen_k = 33, 150
    q, k, v = _inputs(device, torch.float16, 4, 2, 1, seqlen_q, seqlen_k, 64)
    lengths = torch.tensor([seqlen_k, 100, 1, 0])
    right_padded = torch.arange(seqlen_k)[None, :] < lengths[:, None]
    mask = right_padded.clone()
    mask[1] = right_padded[1].flip(0)  # left padding
    # batch 3 is fully padded: zeros out, zero gradients, no NaN
    _check(device, torch.float16, q, k, v, causal=causal, key_padding_mask=mask.to(device))
    out = flash_attn(q, k, v, causal=causal, key_padding_mask=mask.to(device))
    assert torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.parametrize("causal", [False, True])
def test_padding_outside_the_kept_keys_skips_whole_blocks_exactly(device, causal):
    """Key blocks before the first kept key or after the last one are skipped: right padding
    over several blocks, left padding over several blocks, holes between two kept keys (the
    blocks between them still run), one kept key, none."""
    seqlen_q, seqlen_k = 70, 333
    q, k, v = _inputs(device, torch.float16, 5, 2, 1, seqlen_q, seqlen_k, 64)
    keys = torch.arange(seqlen_k)
    mask = torch.stack(
        [
            keys < 70,  # right padding: the last 4 of 6 blocks (64 keys) hold no kept key
            keys >= 260,  # left padding
            (keys == 3) | (keys == 300),  # the first and the last block, a gap of 4 between
            keys == 200,
            torch.zeros(seqlen_k, dtype=torch.bool),
        ]
    )
    _check(device, torch.float16, q, k, v, causal=causal, key_padding_mask=mask.to(device))


@pytest.mark.parametrize("configs", ["here", "gpu D64", "gpu D64 short keys", "gpu D128"])
def test_causal_self_attention_padded_queries_give_zeros(device, configs):
    """Causal self-attention (seq_q == seq_k) with key padding: the mask marks the queries too.
    Padded rows give exact zeros, lse -inf and zero dq, and pass nothing to dK/dV; the rest is
    the reference's. Right padding over several query blocks, left padding, a hole, one kept
    token, none; also with the GPU tables' block shapes (a padded edge inside a block)."""
    from hf_flashattn.kernels.configs import bwd_dkdv_config, gpu_configs
    from hf_flashattn.op import forced_configs

    seqlen = 300
    tokens = torch.arange(seqlen)
    mask = torch.stack(
        [
            tokens < 130,  # right padding
            tokens >= 70,  # left padding
            (tokens < 100) | (tokens >= 141),  # a hole
            tokens == 5,
            torch.zeros(seqlen, dtype=torch.bool),
        ]
    ).to(device)
    forced = {}
    if configs != "here":
        table = gpu_configs()[int(configs.split()[1].removeprefix("D"))]
        forced = {name: cfg for name, cfg in table.items() if name != "decode"}
    if configs.endswith("short keys"):  # the dK/dV pass's entry for short sequences
        forced["dkdv"] = bwd_dkdv_config(64, False, seqlen)
        assert forced["dkdv"] != gpu_configs()[64]["dkdv"]
    with forced_configs(**forced):
        q, k, v = _inputs(device, torch.float16, 5, 4, 2, seqlen, seqlen, 64)
        _check(device, torch.float16, q, k, v, causal=True, key_padding_mask=mask)
        out, lse = flash_attn(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)
        (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    padded = ~mask[:, None, :].expand(-1, q.shape[1], -1)
    assert torch.equal(out[padded], torch.zeros_like(out[padded]))
    assert torch.equal(dq[padded], torch.zeros_like(dq[padded]))
    assert bool(torch.isneginf(lse[padded]).all())
    # not self-attention (seq_q != seq_k): the same padding is only the keys'
    q2, k2, v2 = _inputs(device, torch.float16, 5, 4, 2, seqlen - 1, seqlen, 64)
    out2 = flash_attn(q2, k2, v2, causal=True, key_padding_mask=mask)
    assert out2[0, :, 200:].abs().amax() > 0  # rows past the right padding still attend


@pytest.mark.parametrize("configs", ["here", "gpu D64", "gpu D128"])
@pytest.mark.parametrize("seqlen_q,causal", [(300, True), (300, False), (77, True), (1, True)])
def test_key_lengths(device, configs, seqlen_q, causal):
    """key_lengths (right padding as counts, the kernels reading no mask): the reference's
    result for the prefix mask it stands for, in causal self-attention (padded queries give
    zeros), without causality, with fewer queries than keys, and one query (split-KV
    decoding, which takes a mask). Lengths ending inside a block and on its edge, one key,
    none, and past both ends (clipped)."""
    from hf_flashattn.kernels.configs import gpu_configs
    from hf_flashattn.op import forced_configs

    seqlen_k = 300
    lengths = torch.tensor([300, 130, 128, 1, 0, -5, 999], dtype=torch.int32, device=device)
    forced = {}
    if configs != "here":
        table = gpu_configs()[int(configs.split()[1].removeprefix("D"))]
        forced = {name: cfg for name, cfg in table.items() if name != "decode"}
    with forced_configs(**forced):
        q, k, v = _inputs(device, torch.float16, 7, 4, 2, seqlen_q, seqlen_k, 64)
        _check(device, torch.float16, q, k, v, causal=causal, key_lengths=lengths)
        out = flash_attn(q, k, v, causal=causal, key_lengths=lengths)
    assert torch.equal(out[4:6], torch.zeros_like(out[4:6]))  # nothing kept: zeros, not NaN


def test_key_lengths_bad_input(device):
    q, k, v = _good(device)
    lengths = torch.tensor([8, 3], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="key_lengths must be int32"):
        flash_attn(q, k, v, key_lengths=lengths.long())
    with pytest.raises(TypeError, match="key_lengths must be a torch.Tensor"):
        flash_attn(q, k, v, key_lengths=[8, 3])
    with pytest.raises(ValueError, match=r"key_lengths must have shape \(batch,\)"):
        flash_attn(q, k, v, key_lengths=lengths[None])
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="key_padding_mask or key_lengths"):
        flash_attn(q, k, v, key_lengths=lengths, key_padding_mask=mask)


@pytest.mark.parametrize("scale", [0.3, -0.7, 0.0])
def test_scale(device, scale):
    """Any finite scale: the forward folds a positive scale into its exponent on unmasked
    blocks (max of raw scores times the scale); a negative one (that max would be the minimum)
    and zero (0 * a masked -inf is NaN) must take the scale-first path."""
    q, k, v = _inputs(device, torch.float16, 2, 2, 2, 80, 80, 64)
    mask = torch.ones(2, 80, dtype=torch.bool, device=device)
    mask[1, 50:] = False
    _check(device, torch.float16, q, k, v, causal=True, scale=scale)
    _check(device, torch.float16, q, k, v, causal=False, scale=scale, key_padding_mask=mask)


@pytest.mark.parametrize(
    "case", ["ragged", "padded queries", "packed", "decode slices", "decode one slice", "dropout"]
)
def test_every_output_written(device, case, poisoned_allocations, monkeypatch):
    """Every allocation arrives full of NaN (the fixture): outputs, lse and gradients must be
    written in full by each path: ragged blocks and a head dim in two chunks, padded query rows
    (zeros, never computed), packed sequences, decoding's slices and their merge, or its one
    slice written without a merge (rows with no key to attend among them), dropout's three
    passes."""
    kw = dict(causal=True)
    if case.startswith("decode"):
        # a slice per key block, or one slice
        programs = 1 if case == "decode one slice" else 1000
        monkeypatch.setattr(op, "_target_programs", lambda device, n, per_sm: programs)
        q, k, v = _inputs(device, torch.float16, 3, 8, 2, 2, 300, 64)
        keys = torch.arange(300)
        mask = torch.stack([keys >= 250, keys == 7, torch.zeros(300, dtype=torch.bool)])
        kw.update(key_padding_mask=mask.to(device))
    else:
        q, k, v = _inputs(device, torch.float16, 2, 2, 2, 129, 129, 80)
    if case == "padded queries":
        kw.update(key_padding_mask=(torch.arange(129) < torch.tensor([[129], [70]])).to(device))
    if case == "packed":
        kw.update(cu_seqlens=torch.tensor([0, 40, 41, 129], device=device, dtype=torch.int32))
    if case == "dropout":
        out, lse = flash_attn(q, k, v, causal=True, dropout_p=0.2, return_lse=True)
        grads = torch.autograd.grad((out.float().sum(), lse[lse.isfinite()].sum()), (q, k, v))
        assert not any(t.isnan().any() for t in (out, lse, *grads))
        return
    _check(device, torch.float16, q, k, v, **kw)


def test_gradients_deterministic(device):
    q, k, v = _inputs(device, torch.float16, 2, 4, 2, 100, 100, 64)
    dout = torch.randn(q.shape, device=device, dtype=q.dtype)
    grads = [
        torch.autograd.grad(flash_attn(q, k, v, causal=True), (q, k, v), dout) for _ in range(2)
    ]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------- lse gradient
@pytest.mark.parametrize("causal", [False, True])
def test_lse_gradient(device, causal):
    """A loss of out and lse: d lse_i / d s_ij = p_ij reaches q and k (and nothing reaches v
    through lse). Batch 1 has every key padded: its lse is -inf and its gradients are 0, and
    the seq_q > seq_k causal rows that see no key are -inf too; never NaN."""
    dtype = torch.float16
    seqlen_q, seqlen_k = 130, 97  # several query blocks; causal rows 0..32 see no key
    q, k, v = _inputs(device, dtype, 3, 4, 2, seqlen_q, seqlen_k, 64)
    mask = torch.ones(3, seqlen_k, dtype=torch.bool)
    mask[1] = False
    mask[2, 50:] = False
    mask = mask.to(device)
    w_out = torch.randn(q.shape, device=device, dtype=torch.float64)
    w_lse = torch.randn(3, 4, seqlen_q, device=device, dtype=torch.float64)

    def loss(out, lse):
        # -inf rows of lse weighted by 0 through where(): finite loss, dlse = 0 there
        lse = torch.where(torch.isfinite(lse), lse, 0.0)
        return (out.double() * w_out).sum() + (lse.double() * w_lse).sum()

    kw = dict(causal=causal, key_padding_mask=mask)
    out, lse = flash_attn(q, k, v, return_lse=True, **kw)
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(*attention_ref(q, k, v, **kw)), (q, k, v))
    lowp_grads = torch.autograd.grad(loss(*attention_ref(q, k, v, upcast=False, **kw)), (q, k, v))
    for name, g, r, lp in zip(("dq", "dk", "dv"), grads, ref_grads, lowp_grads, strict=True):
        assert_close_to_ref(name, g, r, lp, FLOOR[dtype] * 10 * max(1.0, r.abs().max().item()))
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1])), "fully padded: dq = 0"
    if causal:
        assert torch.equal(grads[0][:, :, :33], torch.zeros_like(grads[0][:, :, :33]))


def test_lse_gradient_alone(device):
    """Only lse used (out's gradient is None): d(lse.sum())/dq = sum_j p_ij k_j * scale, and
    v gets zeros. The bug this guards: dlse dropped, so dq came out 0."""
    q, k, v = _inputs(device, torch.float32, 1, 2, 2, 70, 70, 32)
    _, lse = flash_attn(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(lse.sum(), (q, k, v))
    _, lse_ref = attention_ref(q, k, v, causal=True)
    dq_ref, dk_ref = torch.autograd.grad(lse_ref.sum(), (q, k))
    _, lse_lowp = attention_ref(q, k, v, causal=True, upcast=False)
    dq_lowp, dk_lowp = torch.autograd.grad(lse_lowp.sum(), (q, k))
    assert dq_ref.abs().max() > 0.1
    assert_close_to_ref("dq", dq, dq_ref, dq_lowp, 1e-4)
    assert_close_to_ref("dk", dk, dk_ref, dk_lowp, 1e-4)
    assert torch.equal(dv, torch.zeros_like(dv))


# ------------------------------------------------------------------------------- dropout
def _dropout_inputs(device, seqlen_q=64):
    return _inputs(device, torch.float16, 2, 2, 1, seqlen_q, 96, 32)


def test_dropout_seeded(device):
    q, k, v = _dropout_inputs(device)
    torch.manual_seed(1234)
    a = flash_attn(q, k, v, dropout_p=0.3)
    torch.manual_seed(1234)
    b = flash_attn(q, k, v, dropout_p=0.3)
    c = flash_attn(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Philox-offset draw is the CUDA generator's"
)
def test_dropout_key_drawn_from_the_generator_without_a_launch():
    """Eagerly on a GPU the dropout key is an int from the default generator's seed and Philox
    offset (no kernel launch, no host sync): the same after the same torch.manual_seed, new at
    each call, the generator advanced as a random op advances it. Under CUDA graph capture a
    tensor drawn in the graph, so that each replay draws anew."""
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.cuda.default_generators[dev.index]
    torch.manual_seed(5)
    first, second = _new_seed(dev), _new_seed(dev)
    torch.manual_seed(5)
    assert isinstance(first, int) and first == _new_seed(dev) and first != second
    offset = gen.get_offset()
    _new_seed(dev)
    assert gen.get_offset() == offset + 4
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _new_seed(dev)
    assert isinstance(captured, torch.Tensor) and captured.device == dev


def test_dropout_mean_approaches_no_dropout(device):
    q, k, v = (t.detach() for t in _dropout_inputs(device))
    p = 0.5
    mean = torch.zeros(q.shape, dtype=torch.float64, device=device)
    runs = 64
    for _ in range(runs):
        mean += flash_attn(q, k, v, dropout_p=p).double()
    mean /= runs
    exact = flash_attn(q, k, v).double()
    seed = _new_seed(torch.device(device))
    mask_rate = dropout_keep_mask(seed, 2, 2, 64, 96, p, device).float().mean().item()
    assert abs(mask_rate - (1 - p)) < 0.02
    # each run's deviation has std ~ |out| / sqrt(runs): the mean must be much closer than one run
    single = (flash_attn(q, k, v, dropout_p=p).double() - exact).abs().mean()
    assert (mean - exact).abs().mean() < single / 3


def test_dropout_draws_are_independent_across_the_elements_one_philox_call_serves(device):
    """One Philox call draws sixteen elements (a byte each): rows r, r+1, r+8, r+9 x columns c,
    c+1, c+8, c+9 of a 16 x 16 block. Each of the sixteen must keep at rate 1 - p, and they
    must agree only as often as independent draws do (an element reusing another's draw, or
    part of one, agrees every time or far more often)."""
    p = 0.5
    keep = dropout_keep_mask(_new_seed(torch.device(device)), 2, 4, 128, 256, p, device).float()
    # row 16 r1 + 8 r2 + 2 r3 + r4, column likewise: a call is (r1, r3, c1, c3), its element
    # (r2, r4, c2, c4)
    by_call = keep.reshape(2, 4, 8, 2, 4, 2, 16, 2, 4, 2).permute(0, 1, 2, 4, 6, 8, 3, 5, 7, 9)
    by_lane = by_call.reshape(2, 4, 8, 4, 16, 4, 16)
    for lane in range(16):
        assert abs(by_lane[..., lane].mean().item() - (1 - p)) < 0.03, lane
    for a in range(16):
        for b in range(a + 1, 16):
            agree = (by_lane[..., a] == by_lane[..., b]).float().mean().item()
            assert abs(agree - 0.5) < 0.03, (a, b, agree)
    # across calls too: no two row groups or column groups repeat
    assert not torch.equal(by_lane[:, :, 0], by_lane[:, :, 1])
    assert not torch.equal(by_lane[:, :, :, 0], by_lane[:, :, :, 1])
    assert not torch.equal(by_lane[..., 0, :], by_lane[..., 1, :])


def test_dropout_rate_is_applied_at_one_in_256(device):
    """Draws are bytes: the rate applied is the requested one rounded to a multiple of 1/256
    (at most 255/256), and the mask drops at that rate: 0.1 applies 26/256."""
    assert applied_dropout_rate(0.1) == 26 / 256
    assert applied_dropout_rate(2.0**-10) == 0.0
    assert applied_dropout_rate(0.9999) == 255 / 256
    seed = _new_seed(torch.device(device))
    assert dropout_keep_mask(seed, 2, 4, 256, 1024, 2.0**-10, device).all()
    dropped = (~dropout_keep_mask(seed, 8, 8, 256, 1024, 0.1, device)).float().mean().item()
    # 16.8M draws: the rate's standard error is 7e-5, the rounding 1.6e-3
    assert abs(dropped - 26 / 256) < 5e-4


@pytest.mark.parametrize("rate", ["applied", "requested"])
def test_dropout_scales_by_the_applied_rate(device, rate):
    """Kept probabilities scale by 1 / (1 - applied rate): 0.1 applies 26/256, 0.18% apart
    from the requested rate's scale, far above float32's error here (the reference at the
    requested rate must fail)."""
    q, k, v = (t.detach().float() for t in _dropout_inputs(device))
    torch.manual_seed(3)
    out = flash_attn(q, k, v, dropout_p=0.1)
    torch.manual_seed(3)
    keep = dropout_keep_mask(_new_seed(torch.device(device)), 2, 2, 64, 96, 0.1, device)
    p = applied_dropout_rate(0.1) if rate == "applied" else 0.1
    ref, _ = attention_ref(q, k, v, dropout_keep=keep, dropout_p=p)
    error = (out.double() - ref).abs().max().item()
    assert (error < 1e-4) == (rate == "applied"), error


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q", [64, 130])
def test_dropout_gradients_match_reference_with_kernel_mask(device, causal, seqlen_q):
    """seq_q 130 spans several query blocks in every config: a keep mask drawn with
    block-local rows in one pass (forward, dK/dV or dQ) differs from the others there."""
    _check_dropout(device, seqlen_q, 0.25, causal, seed=7)


def _check_dropout(device, seqlen_q, p, causal, seed, key_lengths=None):
    """Output and gradients with dropout against the reference under the kernels' own keep
    mask (drawn again from the same seed through the test hook); key_lengths (a list) goes to
    flash_attn, the prefix mask it stands for to the reference."""
    q, k, v = _dropout_inputs(device, seqlen_q)
    lengths = None
    if key_lengths is not None:
        lengths = torch.tensor(key_lengths, dtype=torch.int32, device=device)
    torch.manual_seed(seed)
    out = flash_attn(q, k, v, dropout_p=p, causal=causal, key_lengths=lengths)
    torch.manual_seed(seed)
    keep = dropout_keep_mask(_new_seed(torch.device(device)), 2, 2, seqlen_q, 96, p, device)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    kw = dict(causal=causal, dropout_keep=keep, dropout_p=applied_dropout_rate(p))
    if lengths is not None:
        kw["key_padding_mask"] = torch.arange(96, device=device) < lengths[:, None]
    ref, _ = attention_ref(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
    lowp, _ = attention_ref(q, k, v, upcast=False, **kw)
    lowp_grads = torch.autograd.grad(lowp, (q, k, v), dout)
    assert_close_to_ref("out", out, ref, lowp, 1e-4)
    for name, g, r, lp in zip(("dq", "dk", "dv"), grads, ref_grads, lowp_grads, strict=True):
        assert_close_to_ref(name, g, r, lp, 1e-3 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("seqlen_q,causal", [(96, True), (64, False)])
def test_dropout_with_key_lengths(device, seqlen_q, causal):
    """A padding collator's batch under dropout (GPT-2 fine-tuning): key lengths, padded
    queries too in causal self-attention."""
    _check_dropout(device, seqlen_q, 0.25, causal, seed=5, key_lengths=[70, 96])


def test_dropout_keep_mask_rows(device):
    """The hook's row selection draws the same rows as the full mask."""
    seed = _new_seed(torch.device(device))
    full = dropout_keep_mask(seed, 2, 3, 100, 70, 0.4, device)
    rows = torch.tensor([99, 0, 64, 63])
    part = dropout_keep_mask(seed, 2, 3, 100, 70, 0.4, device, rows=rows)
    assert torch.equal(part, full[:, :, rows.to(device)])


# ------------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize(
    "shape,window",
    [
        ((2, 4, 2, 150, 150, 64), 40),  # self-attention, window < block, GQA, ragged blocks
        # a window whose first key (and a key block's last query) falls on a block's edge
        ((1, 2, 2, 200, 200, 64), 66),
        ((1, 4, 4, 70, 200, 64), 90),  # bottom-right: a cache longer than the queries
        ((1, 2, 1, 130, 130, 96), 1),  # each query sees itself only; head dim in two chunks
        ((1, 2, 2, 64, 64, 32), 500),  # a window wider than the keys: plain causal
    ],
)
def test_sliding_window(device, shape, window):
    """Query i sees keys (i + seq_k - seq_q - window, i + seq_k - seq_q]: forward, LSE and
    gradients against the reference, every kernel's window mask and block bounds."""
    q, k, v = _inputs(device, torch.float16, *shape)
    _check(device, torch.float16, q, k, v, causal=True, sliding_window=window)


@pytest.mark.parametrize(
    "shape,window",
    [
        ((2, 4, 2, 150, 150, 64), 40),  # self-attention, GQA, ragged blocks
        ((1, 2, 2, 200, 200, 64), 33),  # the window's far ends on block edges (64 - 33 + 1 ...)
        ((1, 4, 4, 70, 200, 64), 90),  # bottom-right aligned, as the causal window
        ((1, 2, 1, 130, 130, 96), 1),  # each query sees itself only; head dim in two chunks
        ((1, 8, 2, 3, 300, 64), 50),  # few queries: the split-KV path reads the window's keys
        ((1, 2, 2, 64, 64, 32), 500),  # a window wider than the keys: plain attention
    ],
)
def test_bidirectional_sliding_window(device, shape, window):
    """causal=False: query i sees keys |i + seq_k - seq_q - j| < window (ModernBERT's local
    layers): forward, LSE and gradients against the reference."""
    q, k, v = _inputs(device, torch.float16, *shape)
    _check(device, torch.float16, q, k, v, causal=False, sliding_window=window)


@pytest.mark.parametrize("configs", ["here", "gpu D64"])
def test_sliding_window_with_padding_and_packing(device, configs):
    """The window with key padding (padded queries too: causal self-attention) and with packed
    sequences: the masks compose; also in the GPU's block shapes."""
    from hf_flashattn.kernels.configs import gpu_configs
    from hf_flashattn.op import forced_configs

    forced = {} if configs == "here" else gpu_configs()[64]
    forced.pop("decode", None)
    with forced_configs(**forced):
        q, k, v = _inputs(device, torch.float16, 2, 4, 2, 160, 160, 64)
        mask = torch.ones(2, 160, dtype=torch.bool)
        mask[0, 120:] = False
        mask[1, :30] = False
        for causal in (True, False):  # the bidirectional window too (padded queries kept)
            kw = dict(causal=causal, sliding_window=50)
            _check(device, torch.float16, q, k, v, key_padding_mask=mask.to(device), **kw)
            cu = torch.tensor([0, 70, 100, 160], device=device)
            _check(device, torch.float16, q, k, v, cu_seqlens=cu, **kw)


# ------------------------------------------------------------------------------- GPU configs
def _config_cases():
    from hf_flashattn.kernels.configs import KernelConfig, gpu_configs

    cases = {f"gpu_d{d}": cfgs for d, cfgs in gpu_configs().items()}
    # the extreme aspect ratios the step-down and future tables may reach
    tall, wide = KernelConfig(128, 16, 4, 1), KernelConfig(16, 128, 4, 1)
    cases["tall"] = dict(fwd=tall, dkdv=wide, dq=tall)
    cases["wide"] = dict(fwd=wide, dkdv=tall, dq=wide)
    # dV and dK in two launches, whatever head dim the table gives that to
    cases["split grads"] = dict(dkdv=KernelConfig(64, 64, 4, 1, split_grads=True))
    return cases


@pytest.mark.parametrize("case", list(_config_cases()))
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_block_configs(device, case, causal):
    """Every block config the GPU runs, forced through whichever backend is here (on the CPU:
    the interpreter, whose own config is 64 x 64): ragged sequences, GQA, padding, dropout."""
    from hf_flashattn.op import forced_configs

    with forced_configs(**_config_cases()[case]):
        q, k, v = _inputs(device, torch.float16, 2, 4, 2, 97, 130, 64)
        mask = torch.ones(2, 130, dtype=torch.bool)
        mask[1, 100:] = False
        _check(device, torch.float16, q, k, v, causal=causal, key_padding_mask=mask.to(device))
        # dropout's backward regenerates the forward's mask in both passes
        _check_dropout(device, 130, 0.3, causal, seed=11)


# ------------------------------------------------------------------------------- layout
def test_layout_bshd_takes_flash_attn_layout_without_copies(device):
    """layout="bshd" reads (batch, seq, heads, dim) as given (no copy: the kernels take
    strides) and returns out in that layout; lse stays (batch, heads, seq)."""
    q, k, v = _inputs(device, torch.float16, 2, 4, 2, 65, 80, 64, layout="bshd")
    q_bshd, k_bshd, v_bshd = (t.transpose(1, 2) for t in (q, k, v))
    assert q_bshd.is_contiguous()
    out, lse = flash_attn(q_bshd, k_bshd, v_bshd, causal=True, layout="bshd", return_lse=True)
    out_ref, lse_ref = flash_attn(q, k, v, causal=True, return_lse=True)
    assert out.shape == q_bshd.shape and out.is_contiguous()
    assert torch.equal(out, out_ref.transpose(1, 2)) and torch.equal(lse, lse_ref)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q_bshd, k_bshd, v_bshd), dout)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), dout.transpose(1, 2))
    for g, r in zip(grads, grads_ref, strict=True):
        assert torch.equal(g, r.transpose(1, 2))


@pytest.mark.parametrize("grad", [True, False])
def test_out_layout_returns_bshd_from_bhsd_inputs(device, grad):
    """out_layout="bshd" (what transformers' attention functions return) gives the bhsd call's
    output transposed, contiguous, with the same gradients through it; a bad value is refused."""
    q, k, v = _inputs(device, torch.float16, 2, 4, 2, 65, 80, 64, layout="bshd")
    with torch.set_grad_enabled(grad):
        out = flash_attn(q, k, v, causal=True, out_layout="bshd")
        out_ref = flash_attn(q, k, v, causal=True)
    assert out.shape == (2, 65, 4, 64) and out.is_contiguous()
    assert torch.equal(out, out_ref.transpose(1, 2))
    assert out.requires_grad == grad
    if grad:
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        grads_ref = torch.autograd.grad(out_ref, (q, k, v), dout.transpose(1, 2))
        for g, r in zip(grads, grads_ref, strict=True):
            assert torch.equal(g, r)
    with pytest.raises(ValueError, match="out_layout"):
        flash_attn(q, k, v, out_layout="sbhd")


def test_layout_mixup_is_caught_where_shapes_tell(device):
    """Shapes cannot always tell the layouts apart (self-attention reads as valid either way),
    but e.g. 12 queries against a 16-key cache in the wrong layout break the heads rule, and
    the error then names the layout it assumed."""
    q = torch.randn(2, 12, 6, 32, device=device, dtype=torch.float16)  # (b, s, h, d)
    k = torch.randn(2, 16, 2, 32, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="layout='bhsd'"):
        flash_attn(q, k, k)
    assert flash_attn(q, k, k, layout="bshd").shape == q.shape
    with pytest.raises(ValueError, match="layout"):
        flash_attn(q, k, k, layout="bsdh")


# ------------------------------------------------------------------------------- bad input
def _good(device):
    q = torch.randn(2, 4, 8, 32, device=device, dtype=torch.float16)
    k = torch.randn(2, 2, 8, 32, device=device, dtype=torch.float16)
    return q, k, k.clone()


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("3d", ValueError, "q must be 4-D"),
        ("head_dim", ValueError, "head_dim"),
        ("batch", ValueError, "batch"),
        ("dtype", TypeError, "dtype"),
        ("int", TypeError, "dtype"),
        ("heads", ValueError, "multiple"),
        ("mask_shape", ValueError, "key_padding_mask"),
        ("mask_dtype", TypeError, "key_padding_mask"),
        ("dropout", ValueError, "dropout_p"),
        ("big_head_dim", ValueError, "head_dim"),
        ("window_zero", ValueError, "sliding_window"),
        ("window_float", TypeError, "sliding_window"),
    ],
)
def test_bad_input(device, case, exc, match):
    q, k, v = _good(device)
    kw = {}
    if case == "3d":
        q = q[0]
    elif case == "head_dim":
        k, v = k[..., :16], v[..., :16]
    elif case == "batch":
        k, v = k[:1], v[:1]
    elif case == "dtype":
        k = k.float()
    elif case == "int":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    elif case == "heads":
        k, v = k[:, :1].expand(2, 3, 8, 32), v[:, :1].expand(2, 3, 8, 32)
    elif case == "mask_shape":
        kw["key_padding_mask"] = torch.ones(2, 7, dtype=torch.bool, device=device)
    elif case == "mask_dtype":
        kw["key_padding_mask"] = torch.ones(2, 8, device=device)
    elif case == "dropout":
        kw["dropout_p"] = 1.0
    elif case == "big_head_dim":
        q, k, v = (torch.randn(1, 1, 4, 264, device=device, dtype=torch.float16) for _ in range(3))
    elif case.startswith("window"):
        kw["sliding_window"] = {"window_zero": 0, "window_float": 4.0}[case]
    with pytest.raises(exc, match=match):
        flash_attn(q, k, v, **kw)


# ------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 48, 96, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_odd_head_dims(device, head_dim, dtype):
    q, k, v = _inputs(device, dtype, 2, 8, 2, 1000, 1100, head_dim)
    _check(device, dtype, q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_long_sequence_bf16(device, causal):
    q, k, v = _inputs(device, torch.bfloat16, 1, 4, 2, 16384, 16384, 128)
    _check(device, torch.bfloat16, q, k, v, causal=causal)


@pytest.mark.gpu
def test_runs_on_the_device_of_q_whatever_is_current():
    """Triton launches on the current device: with cuda:0 current and q on cuda:1, the kernels
    must still run on cuda:1 (and on its current stream), forward and backward, and leave
    cuda:0 current."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    dev = "cuda:1"
    q, k, v = _inputs(dev, torch.float16, 2, 4, 2, 300, 300, 64)
    dout = torch.randn(q.shape, device=dev, dtype=q.dtype)
    with torch.cuda.device(1):
        expected = flash_attn(q, k, v, causal=True)
        expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    with torch.cuda.device(0):
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            out = flash_attn(q, k, v, causal=True)
            grads = torch.autograd.grad(out, (q, k, v), dout)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(dev)
    assert out.device == q.device
    assert torch.equal(out, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        assert torch.equal(g, e)


# ------------------------------------------------------------------------------- launching
def test_config_steps_down_when_shared_memory_runs_out():
    """A GPU with less shared memory than the H100 the tables were tuned on gets the next
    smaller config (fewer stages, then smaller blocks), found once and then remembered."""
    from triton.runtime.errors import OutOfResources

    from hf_flashattn.kernels.configs import KernelConfig
    from hf_flashattn.launch import _Launcher

    attempts, launched = [], []

    class KernelNeedingSmallTiles:
        def __getitem__(self, grid):
            def launch(*args, BLOCK_M, BLOCK_N, num_stages, **meta):
                attempts.append((BLOCK_N, num_stages))
                if BLOCK_N * num_stages > 32:  # stands in for the shared memory a config needs
                    raise OutOfResources(BLOCK_N * num_stages, 32, "shared memory")
                launched.append((grid, BLOCK_M, BLOCK_N, num_stages, meta["HEAD_DIM"]))

            return launch

    cfg = KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    launcher = _Launcher(KernelNeedingSmallTiles(), cfg, "block_n", {"HEAD_DIM": 64})
    launcher(100, 3, (), (), ())  # 100 keys in blocks of BLOCK_N, times 3 heads
    assert attempts == [(64, 3), (64, 2), (64, 1), (32, 1)]
    assert launched == [((4 * 3,), 128, 32, 1, 64)]
    launcher(100, 3, (), (), ())
    assert attempts[4:] == [(32, 1)], "the config that fit is remembered"

    class KernelThatNeverFits:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise OutOfResources(1 << 20, 32, "shared memory")

            return launch

    with pytest.raises(OutOfResources):
        _Launcher(KernelThatNeverFits(), cfg, "block_m", {})(10, 1, (), (), ())


class _CompiledStandIn:
    """Stands in for a compiled Triton kernel: its launcher records what it is called with."""

    def __init__(self, calls, fail=False):
        self.function, self.packed_metadata = "function", "metadata"
        self._calls, self._fail = calls, fail

    def run(self, *args):
        if self._fail:
            raise TypeError("launcher takes other arguments")
        self._calls.append(args)


class _JitStandIn:
    """Stands in for a @triton.jit kernel: signature ``(X, scale, n, BLOCK_M, BLOCK_N, FLAG)``
    with the last three constexpr (``n`` unspecialised with ``free_n``); ``kernel[grid](...)``
    records a slow launch."""

    def __init__(self, fail_direct=False, free_n=False):
        from types import SimpleNamespace

        self.params = [
            SimpleNamespace(name=name, is_constexpr=constexpr, do_not_specialize=free)
            for name, constexpr, free in (
                ("X", False, False), ("scale", False, False), ("n", False, free_n),
                ("BLOCK_M", True, False), ("BLOCK_N", True, False), ("FLAG", True, False),
            )
        ]  # fmt: skip
        self.slow, self.direct = [], []
        self._fail_direct = fail_direct

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.slow.append((grid, args))
            return _CompiledStandIn(self.direct, self._fail_direct)

        return launch


def _direct_launcher(kernel, monkeypatch):
    from hf_flashattn import launch
    from hf_flashattn.kernels.configs import KernelConfig

    monkeypatch.setattr(launch, "_stream_getter", lambda: lambda index: f"stream{index}")
    monkeypatch.setitem(launch._direct_launch, "enabled", True)
    cfg = KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)
    return launch._Launcher(kernel, cfg, "block_m", {"FLAG": 7})


def test_launches_reuse_the_compiled_kernel_per_binary_key(monkeypatch):
    """After one kernel[grid] launch per binary key (int values, element types, device; every
    tensor 16-byte aligned), calls go straight to the compiled kernel's launcher with raw
    pointers and the constexprs appended in signature order; anything that can change the
    binary launches the safe way again."""
    from hf_flashattn import launch

    kernel = _JitStandIn()
    launcher = _direct_launcher(kernel, monkeypatch)
    x = torch.zeros(64, dtype=torch.float16)
    launcher(40, 2, (x,), (0.5,), (40,))
    assert kernel.slow == [((3 * 2,), (x, 0.5, 40))] and kernel.direct == []
    launcher(40, 2, (x,), (0.25,), (40,))  # floats are not specialised: same binary
    assert len(kernel.slow) == 1
    assert kernel.direct == [(6, 1, 1, f"stream{x.get_device()}", "function", "metadata",
                              None, None, None, x.data_ptr(), 0.25, 40, 16, 32, 7)]  # fmt: skip
    launcher(48, 2, (x,), (0.5,), (48,))  # another int value: another binary key
    launcher(40, 2, (x.view(torch.bfloat16),), (0.5,), (40,))  # another element type: too
    launcher(40, 2, (x[1:],), (0.5,), (40,))  # misaligned by 2 bytes: never direct
    launcher(40, 2, (x[1:],), (0.5,), (40,))
    assert len(kernel.slow) == 5 and len(kernel.direct) == 1
    launcher(48, 2, (x,), (0.5,), (48,))
    assert len(kernel.slow) == 5 and kernel.direct[-1][0] == 3 * 2

    # a profiler's launch hook must be called: while one is set, kernel[grid] launches
    monkeypatch.setattr(launch, "_hooks_set", lambda: True)
    launcher(40, 2, (x,), (0.5,), (40,))
    assert len(kernel.slow) == 6 and len(kernel.direct) == 2


def test_unspecialised_ints_key_only_their_width(monkeypatch):
    """An int the kernel leaves unspecialised (a length growing every decoding step) keeps the
    compiled kernel for every value of the same width; past 32 bits it is another binary."""
    kernel = _JitStandIn(free_n=True)
    launcher = _direct_launcher(kernel, monkeypatch)
    x = torch.zeros(64, dtype=torch.float16)
    for n in (40, 41, 4096, 2**31 - 1):
        launcher(40, 2, (x,), (0.5,), (n,))
    assert len(kernel.slow) == 1 and [call[-4] for call in kernel.direct] == [41, 4096, 2**31 - 1]
    launcher(40, 2, (x,), (0.5,), (2**31,))
    assert len(kernel.slow) == 2


def test_causal_launches_give_each_program_a_pair_of_blocks(monkeypatch):
    kernel = _JitStandIn()
    launcher = _direct_launcher(kernel, monkeypatch)
    launcher.paired = True
    x = torch.zeros(64, dtype=torch.float16)
    for rows, programs in ((16, 1), (32, 1), (48, 2), (160, 5)):  # blocks of 16 rows
        launcher(rows, 3, (x,), (0.5,), (rows,))
        assert kernel.slow[-1][0] == (programs * 3,)


def test_direct_launch_falls_back_when_the_launcher_convention_differs(monkeypatch):
    from hf_flashattn import launch

    kernel = _JitStandIn(fail_direct=True)
    launcher = _direct_launcher(kernel, monkeypatch)
    x = torch.zeros(64, dtype=torch.float16)
    launcher(40, 2, (x,), (0.5,), (40,))
    with pytest.warns(UserWarning, match="direct kernel launch unavailable"):
        launcher(40, 2, (x,), (0.5,), (40,))
    assert len(kernel.slow) == 2, "the call still launched, the safe way"
    assert launch._direct_launch["enabled"] is False
    launcher(40, 2, (x,), (0.5,), (40,))
    assert len(kernel.slow) == 3


def test_programs_per_sm_read_off_the_binary(monkeypatch):
    """How many programs an SM holds at once: the least of what the binary's registers
    (allocated per warp in 256s), shared memory (plus 1 KB reserved a block) and threads allow,
    on the binary compiled for the call's arguments without launching it, asked once."""
    from types import SimpleNamespace

    from hf_flashattn import launch

    sm = SimpleNamespace(
        regs_per_multiprocessor=65536,
        shared_memory_per_multiprocessor=228 * 1024,
        max_threads_per_multi_processor=2048,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: sm)

    class Binary:
        def __init__(self, n_regs, shared, num_warps):
            self.n_regs, self.run = n_regs, "launcher"
            self.metadata = SimpleNamespace(shared=shared, num_warps=num_warps)

    class Kernel(_JitStandIn):
        binary = None

        def warmup(self, *args, grid, **meta):
            self.slow.append(("warmup", args))
            return self.binary

    x = torch.zeros(64, dtype=torch.float16)
    for binary, resident in (
        (Binary(128, 38912, 4), 4),  # registers: 128 x 32 x 4 = 16k of 64k
        (Binary(125, 38912, 4), 4),  # 125 registers are allocated as 128
        (Binary(64, 100_000, 4), 2),  # shared memory
        (Binary(32, 1024, 16), 4),  # threads: 512 of 2048
        (Binary(0, 1024, 4), None),  # no register count: unknown, and not asked again
    ):
        kernel = Kernel()
        kernel.binary = binary
        launcher = _direct_launcher(kernel, monkeypatch)
        assert launcher.programs_per_sm((x,), (0.5,), (40,)) == resident
        assert launcher.programs_per_sm((x,), (0.5,), (40,)) == resident
        assert kernel.slow == [("warmup", (x, 0.5, 40))] and kernel.direct == []
        assert launcher.registers == (binary.n_regs or None)
    interpreted = launch._Launcher(Kernel(), launcher.cfg, "block_m", {}, direct=False)
    assert interpreted.programs_per_sm((x,), (0.5,), (40,)) is None


def test_register_cap_reaches_the_compiler():
    """A config's ``max_registers`` compiles with ptxas' ``maxnreg`` (the residency that sized
    a grid holds); without one the count is left to the compiler."""
    from dataclasses import replace

    from hf_flashattn import launch
    from hf_flashattn.kernels.configs import KernelConfig

    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(meta.get("maxnreg"))

    cfg = KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)
    for cap in (128, None):
        capped = replace(cfg, max_registers=cap)
        launch._Launcher(Kernel(), capped, "block_m", {}, direct=False)(10, 1, (), (), ())
    assert launched == [128, None]


def test_eager_calls_skip_the_custom_op(device, monkeypatch):
    """Eager calls launch the kernels directly (the custom op's dispatch costs more host time
    than the launches); the custom op is what torch.compile traces."""
    from hf_flashattn import op

    def fail(*args, **kwargs):
        raise AssertionError("eager call went through the custom op")

    monkeypatch.setattr(op, "_fwd_op", fail)
    monkeypatch.setattr(op, "_bwd_op", fail)
    q, k, v = _inputs(device, torch.float16, 1, 2, 1, 20, 20, 32)
    flash_attn(q, k, v, causal=True).sum().backward()
    with torch.no_grad():
        flash_attn(q, k, v)


@pytest.mark.parametrize("case", ["plain", "packed", "sliding window", "softcap", "key lengths"])
def test_custom_op_matches_eager_path(device, case):
    """The torch.compile path (custom ops, their autograd) runs the same launch functions, with
    packed sequences' token bounds, a sliding window, soft-capped logits and key lengths (in
    the key padding mask's place) too."""
    from hf_flashattn import op
    from hf_flashattn.packing import token_bounds

    packed = case == "packed"
    seqlen_k = 40 if packed or case == "key lengths" else 50
    q, k, v = _inputs(device, torch.float16, 1, 4, 2, 40, seqlen_k, 32)
    segments = token_bounds(torch.tensor([0, 15, 40], device=device), 40) if packed else None
    window = 7 if case == "sliding window" else 0
    softcap = 2.0 if case == "softcap" else 0.0
    lengths = None
    if case == "key lengths":
        lengths = torch.tensor([29], dtype=torch.int32, device=device)
    args = (q, k, v, lengths, segments, True, 32**-0.5, 0.0, None, window, softcap)
    out, lse = op._fwd_op(*args)
    out_e, lse_e = op._FlashAttn.apply(False, *args)  # False: out as bhsd
    assert torch.equal(out, out_e) and torch.equal(lse, lse_e)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    grads_e = torch.autograd.grad((out_e, lse_e), (q, k, v), (dout, dlse))
    for a, b in zip(grads, grads_e, strict=True):
        assert torch.equal(a, b)
    torch.library.opcheck(op._fwd_op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph_with_dropout(device, monkeypatch):
    """torch.compile(fullgraph=True) traces the custom ops, dropout seed included (a tensor
    drawn by torch.randint, no .item()), and gives what eager gives for the same seed tensor.
    (Eagerly on a GPU the key comes from the generator's Philox offset instead, with no
    launch: op._new_seed. The eager call here takes the compiled graph's draw.)"""

    def loss(q, k, v):
        out, lse = flash_attn(q, k, v, causal=True, dropout_p=0.2, return_lse=True)
        return out.float().sum() + lse.sum()

    q, k, v = _inputs(device, torch.float32, 1, 2, 1, 40, 40, 32)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    value = compiled(q, k, v)
    grads = torch.autograd.grad(value, (q, k, v))
    monkeypatch.setattr(op, "_new_seed", op._graph_seed)
    torch.manual_seed(3)
    value_e = loss(q, k, v)
    grads_e = torch.autograd.grad(value_e, (q, k, v))
    assert torch.equal(value, value_e)
    for a, b in zip(grads, grads_e, strict=True):
        assert torch.equal(a, b)
