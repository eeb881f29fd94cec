"""Split-KV forward (flash-decoding) for few queries against many keys, in Triton.

Decoding asks for one (or a few) query rows per head against a long cache. The main forward
gives each (batch, query head) one program walking every key: a batch-1 step fills a fraction
of the GPU and loads each K/V block once per query head of a GQA group. Here one program owns
one (batch, K/V head) and one slice of the keys, with every query row of the group packed into
the rows of one tile (row r: query head ``r // seqlen_q`` of the group, query ``r % seqlen_q``),
so each K/V block is loaded once for the whole group. Each program writes its slice's output,
normalised, and its log-sum-exp; the combine kernel merges the slices exactly through them. With
one slice (ONE_SLICE) the program writes the output and log-sum-exp itself, and nothing merges.
Masks as in the main forward: key padding, bottom-right causal alignment, the sequence end.
"""

import triton
import triton.language as tl

from .fwd import _softcapped, _visible


# Lengths, the mask's row stride and the cache's batch/head strides change every decoding step
# (a dynamic cache grows by a copy): unspecialised, one compiled kernel serves every step
# (launch.py keys on the rest). KV_ALIGNED gives back what specialisation told the compiler
# of those strides, divisibility by 16, for wide loads: the host then passes them divided by
# 16 and the kernel multiplies them back (a hint on a kernel argument itself is not kept).
@triton.jit(
    do_not_specialize=[
        "stride_kb", "stride_kh", "stride_vb", "stride_vh", "stride_kpm_b",
        "seqlen_k", "split_len", "n_splits", "n_parts",
    ]
)  # fmt: skip
def attn_decode_split_kernel(
    Q,
    K,
    V,
    Parts,
    KPM,
    Out,
    LSE,
    qk_scale,
    softcap,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_kpm_b,
    num_heads_kv,
    seqlen_q,
    seqlen_k,
    split_len,
    n_splits,
    n_parts,
    window,
    shift,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_ALIGNED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ONE_SLICE: tl.constexpr,
):
    if KV_ALIGNED:
        stride_kb = stride_kb * 16
        stride_kh = stride_kh * 16
        stride_vb = stride_vb * 16
        stride_vh = stride_vh * 16
    # One grid axis: splits fastest, then batch * K/V heads
    pid = tl.program_id(0)
    split = pid % n_splits
    bh_kv = pid // n_splits
    # 64-bit offsets: a head, a row or a batch element may lie past 2^31 elements
    b = (bh_kv // num_heads_kv).to(tl.int64)
    h_kv = (bh_kv % num_heads_kv).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * seqlen_q
    head = h_kv * GROUP + rows // seqlen_q  # query head of each row
    qi = rows % seqlen_q  # query index of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q = tl.load(
        Q
        + b * stride_qb
        + head[:, None] * stride_qh
        + qi[:, None].to(tl.int64) * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn
    k_ptrs += offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn
    v_ptrs += offs_d[None, :] * stride_vd
    kpm_ptr = KPM + b * stride_kpm_b

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Bottom-right causal alignment: query i sees keys j <= i + (seqlen_k - seqlen_q), moved
    # right by shift (op._diagonal: a bidirectional sliding window)
    causal_offset = seqlen_k - seqlen_q + shift
    start = split * split_len
    end = tl.minimum(start + split_len, seqlen_k)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)  # slices start at multiples of BLOCK_N
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < end) & d_mask[None, :]
        # 64-bit: start_n * stride_kn passes 2^31 once one batch element spans 2^31 elements
        k = tl.load(k_ptrs + start_n.to(tl.int64) * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n.to(tl.int64) * stride_vn, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            qk, _ = _softcapped(qk, qk_scale, softcap)
        else:
            qk = qk * qk_scale
        valid = _visible(
            qi[:, None], cols[None, :], end, causal_offset, window, IS_CAUSAL, HAS_WINDOW
        )
        if HAS_KPM:
            keep_col = tl.load(kpm_ptr + cols, mask=cols < end, other=0)
            valid = valid & (keep_col[None, :] != 0)
        qk = tl.where(valid, qk, float("-inf"))
        # -- online softmax; a row that has seen only masked keys keeps m = -inf, so subtract 0
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # this slice's output, normalised, and its log2-sum-exp (-inf where it saw no key)
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    if ONE_SLICE:
        # one slice (n_splits 1): its output is the attention's, stored as the combine kernel
        # stores it, and no merge runs
        row = (b * num_heads_kv * GROUP + head) * seqlen_q + qi
        tl.store(LSE + row, lse2 * 0.6931471805599453, mask=row_ok)  # natural log
        tl.store(
            Out
            + b * stride_ob
            + head[:, None] * stride_oh
            + qi[:, None].to(tl.int64) * stride_om
            + offs_d[None, :] * stride_od,
            acc.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & d_mask[None, :],
        )
    else:
        # partials: (batch, heads_q, n_splits, seqlen_q) rows of HEAD_DIM floats, then their
        # log2-sum-exps (one buffer: one allocation per call, host time in decoding)
        part = ((b * num_heads_kv * GROUP + head) * n_splits + split) * seqlen_q + qi
        tl.store(Parts + n_parts.to(tl.int64) * HEAD_DIM + part, lse2, mask=row_ok)
        tl.store(
            Parts + part[:, None] * HEAD_DIM + offs_d[None, :],
            acc,
            mask=row_ok[:, None] & d_mask[None, :],
        )


@triton.jit(do_not_specialize=["n_splits", "n_parts"])
def attn_decode_combine_kernel(
    Parts,
    Out,
    LSE,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    num_heads_q,
    seqlen_q,
    n_splits,
    n_parts,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merges the slices of one (batch, query head, query): weights exp(lse_s - max), so the
    result is the softmax over all keys; no key anywhere gives zeros and lse = -inf."""
    row = tl.program_id(0).to(tl.int64)  # (batch * heads_q + head) * seqlen_q + query
    qi = row % seqlen_q
    bh = row // seqlen_q
    b = bh // num_heads_q
    h = bh % num_heads_q
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < n_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    part = (bh * n_splits + splits) * seqlen_q + qi
    lse2 = tl.load(Parts + n_parts.to(tl.int64) * HEAD_DIM + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse2 - m_sub)
    total = tl.sum(w, 0)
    o = tl.load(
        Parts + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & d_mask[None, :],
        other=0.0,
    )
    empty = total == 0.0
    out = tl.sum(w[:, None] * o, 0) / tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("-inf"), (m_sub + tl.math.log2(tl.where(empty, 1.0, total))))
    tl.store(LSE + row, lse * 0.6931471805599453)  # natural log, as the main forward's
    tl.store(
        Out + b * stride_ob + h * stride_oh + qi * stride_om + offs_d * stride_od,
        out.to(Out.dtype.element_ty),
        mask=d_mask,
    )
