"""flash_attn at the edges: launch-grid limits, 2^31-element offsets, dropout at 2^17, long
context memory, huge logits, non-finite inputs, streams and CUDA graphs, leaks.

Tolerances follow DEVELOPERS.md (``assert_close_to_ref``). Tests that need a GPU are marked
``gpu``; those that can wreck the CUDA context when they fail (out-of-bounds pointers) run in a
subprocess so that the rest of the session survives them.

Behaviour with non-finite inputs (decided here, and held by ``test_nan_*``/``test_inf_*``):
NaN or +-Inf in q row i gives NaN in output row i only (an Inf logit makes the softmax's
inf - inf); NaN in key j's k or v gives NaN in every output row that attends key j, and Inf in
v gives non-finite values there; an Inf in k follows the arithmetic (a -inf logit drops the
key, +inf gives NaN). Rows of other (batch, head) slices, and in the q case every other row,
are bitwise as with finite inputs. Nothing raises, nothing hangs. Rows that do not attend key
j but share a block with rows that do may turn NaN too (0 * NaN in P @ V, as in PyTorch's own
attention): keys hidden by key_padding_mask must still hold finite values.
"""

import gc
import inspect
import math
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from attention_ref import assert_close_to_ref, attention_ref
from conftest import DEVICE
from test_properties import FLOOR

from hf_flashattn import flash_attn
from hf_flashattn.op import dropout_keep_mask

TWO_31 = 2**31


def _randn(*shape, dtype=torch.float16, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _assert_matches_ref(out, q, k, v, grads=None, dout=None, **kw):
    """out (and, given dout, grads = (dq, dk, dv)) against the reference, by the rule."""
    ref, _ = attention_ref(q, k, v, **kw)
    lowp, _ = attention_ref(q, k, v, upcast=False, **kw)
    floor = FLOOR[q.dtype]
    assert_close_to_ref("out", out, ref, lowp, floor)
    if grads is not None:
        ref_g = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
        lowp_g = torch.autograd.grad(lowp, (q, k, v), dout)
        for name, g, r, lp in zip(("dq", "dk", "dv"), grads, ref_g, lowp_g, strict=True):
            assert_close_to_ref(name, g, r, lp, floor * 10 * max(1.0, r.abs().max().item()))


# ------------------------------------------------------------------------- launch grid
@pytest.mark.gpu
def test_batch_times_heads_beyond_grid_limit():
    """CUDA caps grid axes 1 and 2 at 65,535 programs: batch * heads = 70,400 must still
    work, forward and backward (the dK/dV pass launches batch * heads_kv programs)."""
    q, k, v = (_randn(4400, 16, 8, 64).requires_grad_() for _ in range(3))
    out = flash_attn(q, k, v, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _assert_matches_ref(out, q, k, v, grads, dout, causal=True)


# ------------------------------------------------------------------------- dropout at 2^17
P_DROP = 0.5


@pytest.mark.gpu
def test_dropout_rows_2_15_apart_differ_at_seqlen_2_17():
    """A 32-bit Philox counter i * seqlen_k + j (the first scheme) gives rows i and i + 2^15 the
    same counters at seqlen_k = 2^17, hence the same keep pattern. With q = 0 every
    row has the same probabilities, so two rows' outputs are bitwise equal exactly when their
    keep patterns are: rows i and i + 2^15 must differ."""
    seqlen_q, seqlen_k, half = 2**15 + 128, 2**17, 2**15
    q = torch.zeros(1, 1, seqlen_q, 64, device=DEVICE, dtype=torch.float16)
    k, v = _randn(1, 1, seqlen_k, 64), _randn(1, 1, seqlen_k, 64)
    out = flash_attn(q, k, v, dropout_p=P_DROP)[0, 0]
    assert torch.isfinite(out).all()
    # control: neighbouring rows draw different patterns, so different outputs
    assert not torch.equal(out[0], out[1])
    same = [i for i in range(128) if torch.equal(out[i], out[i + half])]
    assert not same, f"rows {same[:8]}... repeat the keep pattern of rows 2^15 further on"


def test_dropout_keep_mask_has_no_period_of_2_32_counters():
    """The same wrap at the mask hook, cheap enough for the CPU: with seqlen_k = 64, rows i and
    i + 2^26 would have 32-bit counters i * seqlen_k + j exactly 2^32 apart. Needs the hook
    to draw selected rows only (``dropout_keep_mask(..., rows=...)``): the full mask would be
    2^32 bytes."""
    if "rows" not in inspect.signature(dropout_keep_mask).parameters:
        pytest.fail(
            "needs the test hook dropout_keep_mask(seed, batch, heads_q, seqlen_q, seqlen_k, "
            "dropout_p, device, rows=None), rows a 1-D int64 tensor of query rows, returning "
            "mask[:, :, rows] of shape (batch, heads_q, len(rows), seqlen_k) without drawing "
            "the other rows"
        )
    seqlen_k, period = 64, 2**32 // 64
    first = torch.arange(64, device=DEVICE)
    rows = torch.cat([first, first + period, first + 2 * period])
    mask = dropout_keep_mask(1234, 1, 2, 2 * period + 64, seqlen_k, P_DROP, DEVICE, rows=rows)
    assert mask.shape == (1, 2, 3 * 64, seqlen_k)
    a, b, c = mask[0, :, :64], mask[0, :, 64:128], mask[0, :, 128:]
    assert 0.4 < a.float().mean().item() < 0.6
    # 2 heads x 64 rows x 64 columns: identical halves would be chance of 2^-8192
    assert not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(b, c)


# ------------------------------------------------------------------------- offsets past 2^31
def _spread_views(count, shape, strides, dtype=torch.float16):
    """``count`` tensors of ``shape`` whose ``strides`` span more than 2^31 elements, over one
    storage that is only reserved, not filled (pages never written cost no memory on the
    CPU): so a batch element "spans 2^31 elements" at the cost of a few KiB. The views start
    2^31 elements into the storage (view i 8192 elements further), so a 32-bit offset that
    wraps (to offset - 2^32) still lands inside it: a wrong answer, not a crash. Filled with
    random values."""
    span = sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
    storage = torch.empty(TWO_31 + span + 8192 * count, dtype=dtype, device=DEVICE)
    views = [storage.as_strided(shape, strides, TWO_31 + 8192 * i) for i in range(count)]
    for view in views:
        view.copy_(torch.randn(shape, device=DEVICE))
    return views


# (name, which input is spread, its shape, its strides): each wraps one 32-bit product
SPREAD = {
    # query head h at h * stride_qh: head 2 at 2^31 + 2^20
    "q_head": ("q", (1, 3, 64, 64), (0, 2**30 + 2**19, 64, 1)),
    # query row m at m * stride_qm: rows 64.. at >= 2^31
    "q_row": ("q", (1, 1, 70, 64), (0, 0, 2**25, 1)),
    # key/value head at h_kv * stride_kh
    "kv_head": ("kv", (1, 3, 64, 64), (0, 2**30 + 2**19, 64, 1)),
    # key block at start_n * stride_kn: the second key block starts at 2^31
    "kv_block": ("kv", (1, 1, 70, 64), (0, 0, 2**25, 1)),
}


@pytest.mark.parametrize("case", SPREAD)
def test_input_spanning_more_than_2_31_elements(case):
    """Offsets into one batch element past 2^31 elements (what a long sequence with many
    heads reaches) must not wrap around in 32-bit arithmetic, forward or backward."""
    which, shape, strides = SPREAD[case]
    small = (1, shape[1], 70, 64)
    if which == "q":
        (q,) = _spread_views(1, shape, strides)
        k, v = _randn(*small), _randn(*small)
    else:
        q = _randn(1, shape[1], 70, 64)
        k, v = _spread_views(2, shape, strides)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attn(q, k, v, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _assert_matches_ref(out, q, k, v, grads, dout, causal=True)


_REAL_SPAN_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from attention_ref import assert_close_to_ref, attention_ref
from hf_flashattn import flash_attn

def check(q, k, v, heads, rows):
    out = flash_attn(q, k, v)
    for h in heads:
        qs, ks, vs = q[:, h:h + 1, rows], k[:, h:h + 1], v[:, h:h + 1]
        ref, _ = attention_ref(qs, ks, vs)
        lowp, _ = attention_ref(qs, ks, vs, upcast=False)
        assert_close_to_ref(f"head {{h}}", out[:, h:h + 1, rows], ref, lowp, 1e-4)

torch.manual_seed(0)
# 2^19 + 2^15 rows x 32 heads x 128: 2.3e9 elements, head 31 starts past 2^31, and so do the
# output's rows past 2^19 (out is (batch, seq, heads, dim) in memory)
n = 2**19 + 2**15
big = lambda: torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
small = lambda s: torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16)
rows = torch.cat([torch.arange(0, 64), torch.arange(2**19 - 32, 2**19 + 32),
                  torch.arange(n - 64, n)]).cuda()
{case}
torch.cuda.synchronize()
print("ok")
"""
_REAL_SPAN_CASES = {
    # many queries against few keys: q's head offset and out's row offset pass 2^31
    "many_queries": "q = big(); check(q, small(64), small(64), (0, 30, 31), rows); del q",
    # few queries against long keys: the K/V head offsets pass 2^31
    "long_keys": "check(small(16), big(), big(), (0, 30, 31), torch.arange(16).cuda())",
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", _REAL_SPAN_CASES)
def test_real_tensors_spanning_more_than_2_31_elements(case, tmp_path):
    """The same as above with real (4.3 GiB, bf16) tensors on the GPU, forward only. In a
    subprocess: a wrapped offset reads or writes outside the allocations, which can leave the
    CUDA context unusable for every later test."""
    script = _REAL_SPAN_SCRIPT.format(tests=os.path.dirname(__file__), case=_REAL_SPAN_CASES[case])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------- long context
@pytest.mark.gpu
def test_128k_causal_memory_is_linear():
    """128k tokens, 8 query / 2 K/V heads, head_dim 128, causal, forward + backward: the extra
    memory is the outputs and gradients (O(N)), never the N x N scores (N^2 = 16 GiB per head
    even at one byte each). First and last query rows checked against the reference."""
    n, hq, hkv, d = 2**17, 8, 2, 128
    q = _randn(1, hq, n, d, dtype=torch.bfloat16).requires_grad_()
    k, v = (_randn(1, hkv, n, d, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    dout = _randn(1, hq, n, d, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = flash_attn(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # out, dq, dk, dv are the size of q, k, v; lse and delta are 4 bytes per row and head
    expected = out.nbytes + dq.nbytes + dk.nbytes + dv.nbytes + 2 * 4 * hq * n
    assert extra <= 1.25 * expected + 64 * 2**20, f"{extra / 2**30:.2f} GiB extra"
    assert extra < n * n / 8

    edge = 128
    first = (slice(None), slice(None), slice(0, edge))
    last = (slice(None), slice(None), slice(n - edge, n))
    for rows, keys in ((first, first), (last, (slice(None),) * 3)):
        qs = q.detach()[rows].requires_grad_()
        ref_args = (qs, k.detach()[keys], v.detach()[keys])
        # bottom-right causal alignment makes the last rows against all keys the same rows
        ref, _ = attention_ref(*ref_args, causal=True)
        lowp, _ = attention_ref(*ref_args, causal=True, upcast=False)
        assert_close_to_ref("out", out[rows], ref, lowp, 1e-4)
        (dq_ref,) = torch.autograd.grad(ref, qs, dout[rows].float())
        (dq_lowp,) = torch.autograd.grad(lowp, qs, dout[rows])
        assert_close_to_ref("dq", dq[rows], dq_ref, dq_lowp, 1e-3 * dq_ref.abs().max().item())


# ------------------------------------------------------------------------- huge logits
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_logits_stay_finite(dtype, causal):
    """q scaled so the logits are in the thousands (softmax is nearly one-hot, exp of the raw
    logits overflows float32): output, lse and gradients finite and as close as PyTorch's.

    One derived allowance: the backward recomputes P as exp(s - lse) from the float32 lse,
    which at |lse| ~ 1e3 is itself rounded by ~1e-4, so P carries that relative error (PyTorch
    subtracts the row max of the very same scores instead, exactly). Seen: fp32 dV 4-14x
    PyTorch's fp32 error, within the allowance of 8 float32 ulps of max|lse| times max|grad|."""
    q = _randn(2, 2, 65, 64, dtype=dtype, scale=400.0).requires_grad_()
    k, v = (_randn(2, 2, 130, 64, dtype=dtype).requires_grad_() for _ in range(2))
    out, lse = flash_attn(q, k, v, causal=causal, return_lse=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads)

    ref, lse_ref = attention_ref(q, k, v, causal=causal)
    lse_max = lse_ref.abs().max().item()
    assert lse_max > 1000, "the test needs logits in the thousands"
    lowp, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_close_to_ref("out", out, ref, lowp, FLOOR[dtype])
    # lse ~ the largest logit: float32 rounding at that magnitude
    assert (lse - lse_ref).abs().max().item() <= 1e-5 * lse_max
    lse_ulp = torch.finfo(torch.float32).eps * 2 ** math.floor(math.log2(lse_max))
    ref_g = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
    lowp_g = torch.autograd.grad(lowp, (q, k, v), dout)
    for name, g, r, lp in zip(("dq", "dk", "dv"), grads, ref_g, lowp_g, strict=True):
        r_max = r.abs().max().item()
        assert_close_to_ref(name, g, r, lp, (FLOOR[dtype] * 10 + 8 * lse_ulp) * max(1.0, r_max))


# ------------------------------------------------------------------------- non-finite inputs
def _nonfinite_case():
    """(batch 2, heads 2, 70 queries, 130 keys) fp32 inputs and their clean causal output.
    Row i sees keys j <= i + 60: key 100 is attended by rows 40.. of query head 0 (GQA 1)."""
    q, k, v = (_randn(2, 2, n, 32, dtype=torch.float32) for n in (70, 130, 130))
    return q, k, v, flash_attn(q, k, v, causal=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_query_gives_nan_in_its_row_only(bad):
    q, k, v, clean = _nonfinite_case()
    q[0, 1, 5, 3] = bad
    q.requires_grad_()
    out = flash_attn(q, k, v, causal=True)
    # +-inf in q: some logits are +inf, and the softmax's inf - inf is NaN
    assert torch.isnan(out[0, 1, 5]).all()
    others = torch.ones(out.shape[:3], dtype=torch.bool, device=DEVICE)
    others[0, 1, 5] = False
    assert torch.equal(out[others], clean[others]), "rows are independent"
    (dq,) = torch.autograd.grad(out, q, torch.ones_like(out))
    assert torch.isnan(dq[0, 1, 5]).any()
    assert torch.isfinite(dq[1]).all() and torch.isfinite(dq[0, 0]).all()


@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_key_gives_nan_in_the_rows_that_attend_it(where):
    q, k, v, clean = _nonfinite_case()
    {"k": k, "v": v}[where][0, 0, 100, 7] = float("nan")
    out = flash_attn(q, k, v, causal=True)
    assert torch.isnan(out[0, 0, 40:]).any(dim=-1).all(), "every row attending key 100"
    assert torch.equal(out[0, 1], clean[0, 1]) and torch.equal(out[1], clean[1]), (
        "other heads and batch elements are untouched"
    )
    # rows 0..39 share query blocks with rows that load key 100: unspecified (docstring)


def test_inf_value_gives_nonfinite_rows_that_attend_it():
    q, k, v, clean = _nonfinite_case()
    v[0, 0, 100, 7] = float("inf")
    out = flash_attn(q, k, v, causal=True)
    assert not torch.isfinite(out[0, 0, 40:, 7]).any()
    assert torch.equal(out[1], clean[1])


def test_nan_beyond_a_views_end_is_never_read():
    """Inputs sliced out of larger NaN-filled buffers: the kernels read within the view only
    (masked loads), so nothing beyond seq_q / seq_k / head_dim leaks in."""
    views = []
    for n in (70, 130, 130):
        full = torch.full((2, 2, 200, 48), float("nan"), device=DEVICE)
        views.append(full[:, :, :n, :40].copy_(torch.randn(2, 2, n, 40, device=DEVICE)))
    q, k, v = views
    out = flash_attn(q, k, v, causal=True)
    ref, _ = attention_ref(q, k, v, causal=True)
    lowp, _ = attention_ref(q, k, v, causal=True, upcast=False)
    assert_close_to_ref("out", out, ref, lowp, FLOOR[torch.float32])


def test_nonfinite_scale_is_rejected():
    q = _randn(1, 1, 8, 16)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            flash_attn(q, q, q, scale=scale)


# ------------------------------------------------------------------------- leaks
def test_nothing_kept_alive_after_a_call():
    """After forward and backward, dropping the results frees every tensor: no cache in the
    op holds inputs, outputs or masks (the CPU view of the GPU leak test below)."""
    q, k, v = (_randn(1, 2, 40, 32).requires_grad_() for _ in range(3))
    mask = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    out, lse = flash_attn(q, k, v, key_padding_mask=mask, dropout_p=0.1, return_lse=True)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    refs = [weakref.ref(t) for t in (q, k, v, mask, out, lse)]
    del q, k, v, mask, out, lse
    gc.collect()
    alive = [i for i, r in enumerate(refs) if r() is not None]
    assert not alive, f"still alive: {[('q', 'k', 'v', 'mask', 'out', 'lse')[i] for i in alive]}"


@pytest.mark.gpu
def test_thousands_of_calls_leave_no_memory_behind():
    q, k, v = (_randn(2, 4, 97, 64).requires_grad_() for _ in range(3))
    mask = torch.rand(2, 97, device=DEVICE) > 0.2

    def step(i):
        out, lse = flash_attn(
            q,
            k,
            v,
            causal=i % 2 == 0,
            key_padding_mask=mask if i % 3 == 0 else None,
            return_lse=True,
        )
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    for i in range(6):  # compiles and config step-downs, first calls' allocations
        step(i)
    # Compiling launches can leave reference cycles holding their arguments until the garbage
    # collector runs (seen on the GPU: memory fell by exactly dq + dk + dv over the loop once
    # later launches went around Triton's compiling path). Collect, so only growth counts.
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(3000):
        step(i)
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


# ------------------------------------------------------------------------- streams, graphs
@pytest.mark.gpu
def test_runs_on_the_current_stream():
    """On a side stream, queued behind a long sleep and a copy that sets q: a launch on any
    other stream would run first and read the old q."""
    q, k, v = (_randn(2, 4, 300, 64) for _ in range(3))
    q_new = _randn(2, 4, 300, 64)
    expected = flash_attn(q_new, k, v, causal=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~ tens of ms of GPU time
        q.copy_(q_new)
        out = flash_attn(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager():
    """Forward and backward captured once in a CUDA graph, replayed on new inputs copied into
    the captured ones: bitwise the eager results (the kernels are deterministic)."""
    shape = (2, 4, 300, 64)
    static = [_randn(*shape).requires_grad_() for _ in range(3)]
    static_dout = _randn(*shape)

    def run():
        out = flash_attn(*static, causal=True)
        return (out, *torch.autograd.grad(out, static, static_dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) outside the capture, as CUDA graphs need
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()

    for _ in range(2):
        fresh = [_randn(*shape) for _ in range(3)]
        fresh_dout = _randn(*shape)
        with torch.no_grad():
            for s, f in zip(static, fresh, strict=True):
                s.copy_(f)
            static_dout.copy_(fresh_dout)
        graph.replay()
        eager_in = [f.requires_grad_() for f in fresh]
        eager_out = flash_attn(*eager_in, causal=True)
        eager = (eager_out, *torch.autograd.grad(eager_out, eager_in, fresh_dout))
        for name, a, b in zip(("out", "dq", "dk", "dv"), captured, eager, strict=True):
            assert torch.equal(a, b), name
