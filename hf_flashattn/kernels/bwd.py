"""FlashAttention-2 backward in Triton: the dQ pass, then the dK/dV pass.

P is never stored: both passes recompute it from Q, K and the forward's log-sum-exp. The dQ
pass keeps one Q block resident and loops over K/V; it also computes the softmax-backward
term ``delta_i = rowsum(dO_i * O_i) - dlse_i`` for its rows (no separate preprocess launch)
and stores it for the dK/dV pass, which runs after it on the same stream. The dK/dV pass
keeps one K/V block resident and loops over the query blocks of every query head that shares
it (GQA sums there, in registers), or of a part of them when there are too few K/V blocks to fill
the GPU (the parts' sums are added on the host). Each output element is written by exactly one
program, so there are no atomics and repeated runs give bitwise-identical gradients.
"""

import triton
import triton.language as tl

from .fwd import (
    _dropout_keep,
    _kept_key_range,
    _key_bounds,
    _program_blocks,
    _segment_mask,
    _segment_span,
    _softcapped,
    _turn_block,
    _visible,
    _within_one_sequence,
)


@triton.jit
def _recompute_p(
    qk,
    lse2,
    offs_m,
    cols,
    kpm_ptr,
    seg_ptr,
    seqlen_q,
    seqlen_k,
    causal_offset,
    window,
    qk_scale,
    softcap,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    # P = exp2(S * scale * log2e - lse * log2e) from the raw scores S; masked entries are 0.
    # Soft-capped: P from the capped scores, and the cap's derivative 1 - tanh^2 for dS (else
    # P again, unused)
    if HAS_SOFTCAP:
        capped, t = _softcapped(qk, qk_scale, softcap)
        p = tl.math.exp2(capped - lse2[:, None])
        dcap = 1.0 - t * t
    else:
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        dcap = p
    if MASKED:
        valid = _visible(
            offs_m[:, None], cols[None, :], seqlen_k, causal_offset, window, IS_CAUSAL, HAS_WINDOW
        )
        if HAS_SEG:
            valid = valid & _segment_mask(seg_ptr, offs_m, cols, seqlen_q, False)
        p = tl.where(valid, p, 0.0)
    if HAS_KPM:
        keep_col = tl.load(kpm_ptr + cols, mask=cols < seqlen_k, other=0)
        p = tl.where(keep_col[None, :] != 0, p, 0.0)
    return p, dcap


@triton.jit
def _load_lse2(LSE, offs_m, seqlen_q):
    # lse in log2 units; rows beyond the sequence or with nothing to attend (lse = -inf) get
    # +inf so that their recomputed P is 0 rather than NaN
    lse = tl.load(LSE + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,
    dv,
    dk1,
    dv1,
    k,
    v,
    k1,
    v1,
    Q,
    DO,
    LSE,
    Delta,
    kpm_ptr,
    seg_ptr,
    lo,
    hi,
    start_n,
    offs_n,
    offs_d,
    offs_d1,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    seqlen_q,
    seqlen_k,
    causal_offset,
    window,
    qk_scale,
    softcap,
    dropout_p,
    seed,
    bh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_D: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GRADS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    # Everything is computed transposed (keys along M): each dot then has M = BLOCK_N, the
    # resident K/V block, which is what Hopper's warpgroup MMA needs (M >= 64). GRADS: which
    # of dV (1) and dK (2) this pass accumulates (3: both; attn_bwd_dkdv_kernel).
    d_mask = offs_d < HEAD_DIM
    keep_scale = 1.0 / (1.0 - dropout_p)  # dropout: kept entries of dP scale up
    cols = start_n + offs_n
    if HAS_KPM:
        keep_col = tl.load(kpm_ptr + cols, mask=cols < seqlen_k, other=0) != 0
    arange_m = tl.arange(0, BLOCK_M)
    q_t_ptrs = Q + arange_m[None, :].to(tl.int64) * stride_qm + offs_d[:, None] * stride_qd
    do_ptrs = DO + arange_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :] * stride_dod
    # SPLIT_D: the head dim's second chunk (configs.head_dim_chunks)
    d1_mask = offs_d1 < HEAD_DIM
    q1_t_ptrs = Q + arange_m[None, :].to(tl.int64) * stride_qm + offs_d1[:, None] * stride_qd
    do1_ptrs = DO + arange_m[:, None].to(tl.int64) * stride_dom + offs_d1[None, :] * stride_dod
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + arange_m
        # 64-bit: start_m * stride_qm passes 2^31 once one batch element spans 2^31 elements
        q_off = start_m.to(tl.int64) * stride_qm
        do_off = start_m.to(tl.int64) * stride_dom
        row_ok = offs_m < seqlen_q
        q_t = tl.load(q_t_ptrs + q_off, mask=row_ok[None, :] & d_mask[:, None], other=0.0)
        do = tl.load(do_ptrs + do_off, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q_t = q_t.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = _load_lse2(LSE, offs_m, seqlen_q)
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
        qk_t = tl.dot(k, q_t, input_precision=DOT_PRECISION)
        if SPLIT_D:
            q1_t = tl.load(q1_t_ptrs + q_off, mask=row_ok[None, :] & d1_mask[:, None], other=0.0)
            do1 = tl.load(do1_ptrs + do_off, mask=row_ok[:, None] & d1_mask[None, :], other=0.0)
            if UPCAST:
                q1_t = q1_t.to(tl.float32)
                do1 = do1.to(tl.float32)
            qk_t = tl.dot(k1, q1_t, qk_t, input_precision=DOT_PRECISION)
        # P^T = exp2(K Q^T * scale * log2e - lse * log2e); masked entries are exactly 0
        if HAS_SOFTCAP:
            capped_t, t_t = _softcapped(qk_t, qk_scale, softcap)
            p_t = tl.math.exp2(capped_t - lse2[None, :])
        else:
            p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASKED:
            valid = _visible(
                offs_m[None, :],
                cols[:, None],
                seqlen_k,
                causal_offset,
                window,
                IS_CAUSAL,
                HAS_WINDOW,
            )
            if HAS_SEG:
                valid = valid & _segment_mask(seg_ptr, offs_m, cols, seqlen_q, True)
            p_t = tl.where(valid, p_t, 0.0)
        if HAS_KPM:
            p_t = tl.where(keep_col[:, None], p_t, 0.0)
        # GRADS 1 (dV alone) needs no dP
        if GRADS & 2:
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if SPLIT_D:
                dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=DOT_PRECISION)
        p_drop_t = p_t
        if HAS_DROPOUT:
            # the forward's mask, in this pass's (key, query) orientation; dV's 1 / (1 - p)
            # multiplies it once at the end
            keep = _dropout_keep(
                seed, bh, start_m, start_n, dropout_p, offs_m.shape[0], offs_n.shape[0], True
            )
            p_drop_t = tl.where(keep, p_t, 0.0)
            if GRADS & 2:
                dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
        if GRADS & 1:
            dv = tl.dot(p_drop_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if GRADS & 2:
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:  # through the cap: d(softcap tanh(x / softcap)) = 1 - tanh^2
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
        if SPLIT_D:
            if GRADS & 1:
                dv1 = tl.dot(p_drop_t.to(do1.dtype), do1, dv1, input_precision=DOT_PRECISION)
            if GRADS & 2:
                dk1 = tl.dot(
                    ds_t.to(q1_t.dtype), tl.trans(q1_t), dk1, input_precision=DOT_PRECISION
                )
    return dk, dv, dk1, dv1


@triton.jit(do_not_specialize=["seed_offset"])
def attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    DK,
    DV,
    KPM,
    Seg,
    Seed,
    qk_scale,
    sm_scale,
    dropout_p,
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
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    stride_kpm_b,
    stride_seg_b,
    stride_part,
    num_heads_q,
    num_heads_kv,
    seqlen_q,
    seqlen_k,
    window,
    shift,
    seed_offset,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    SPLIT_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAD_Q: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    GROUP_PARTS: tl.constexpr,
    GRADS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    KEY_LENGTHS: tl.constexpr,
):
    # GRADS: 3 computes dK and dV; 1 dV alone and 2 dK alone, as two launches of one call
    # (op._backward, configs.KernelConfig.split_grads): one float32 accumulator per program
    # instead of two, for head dims whose pair spills (256), at the cost of recomputing P^T
    # in both
    n_blocks_n = tl.cdiv(seqlen_k, BLOCK_N)
    # causal: the first key blocks meet the most queries; each program pairs one with a light one
    bh_part, first, n_turns = _program_blocks(n_blocks_n, IS_CAUSAL, False)
    # GROUP_PARTS > 1: the GQA group's query heads are shared out among that many programs per
    # K/V block (too few K/V blocks to fill the GPU otherwise); each writes its part's float32
    # dK/dV sums at DK/DV + part * stride_part, and the host adds the parts up
    part = bh_part % GROUP_PARTS
    bh_kv = bh_part // GROUP_PARTS
    HEADS_PER_PART: tl.constexpr = GROUP // GROUP_PARTS
    # 64-bit offsets: a head, a row or a batch element may lie past 2^31 elements
    b64 = (bh_kv // num_heads_kv).to(tl.int64)
    h_kv = (bh_kv % num_heads_kv).to(tl.int64)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed) + seed_offset  # op._seed_args
    offs_d = tl.arange(0, BLOCK_D)
    # SPLIT_D: the head dim's second chunk, columns [BLOCK_D, BLOCK_D + BLOCK_D1); without it
    # its tiles are never loaded and its accumulators (zeros, never updated) fold away
    offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
    kpm_ptr = KPM + b64 * stride_kpm_b
    kept_lo, kept_hi, keys_end = _kept_key_range(kpm_ptr, seqlen_k, HAS_KPM, KEY_LENGTHS)
    READ_KPM: tl.constexpr = HAS_KPM and not KEY_LENGTHS  # the inner loops read the mask
    seg_ptr = Seg + b64 * stride_seg_b
    # bottom-right causal alignment; shift > 0 moves the diagonal right (op._diagonal: a
    # bidirectional sliding window is a causal one with its diagonal moved)
    causal_offset = seqlen_k - seqlen_q + shift
    for turn in range(n_turns):
        start_n = _turn_block(first, turn, n_blocks_n) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        kv1_mask = (offs_n[:, None] < seqlen_k) & (offs_d1[None, :] < HEAD_DIM)
        rows_n = offs_n[:, None].to(tl.int64)
        k_rows = K + b64 * stride_kb + h_kv * stride_kh + rows_n * stride_kn
        v_rows = V + b64 * stride_vb + h_kv * stride_vh + rows_n * stride_vn
        k = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_rows + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        k1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=k.dtype)
        v1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=v.dtype)
        if SPLIT_D:
            k1 = tl.load(k_rows + offs_d1[None, :] * stride_kd, mask=kv1_mask, other=0.0)
            v1 = tl.load(v_rows + offs_d1[None, :] * stride_vd, mask=kv1_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            k1 = k1.to(tl.float32)
            v1 = v1.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        if IS_CAUSAL:
            # rows that see some / all of this key block: j <= i + causal_offset
            lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
            lo_full = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
            lo_full = tl.minimum(
                (lo_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, seqlen_q // BLOCK_M * BLOCK_M
            )
            lo_full = tl.maximum(lo_full, lo)
        else:
            lo = 0
            lo_full = 0
        # the key block itself is ragged at the end of the sequence: mask every block then
        ragged_k = start_n + BLOCK_N > keys_end
        hi_full = seqlen_q // BLOCK_M * BLOCK_M
        q_end = seqlen_q
        if HAS_SEG:
            # packed sequences: only the queries of this key block's sequences, every block
            # masked (a sequence's edge may cut any block) unless the key block lies in one
            # causal sequence: then the rows below its diagonal band, up to the sequence's last
            # whole query block, see all of it
            q_start, q_end = _segment_span(seg_ptr, start_n, BLOCK_N, seqlen_k)
            lo = tl.maximum(lo, q_start // BLOCK_M * BLOCK_M)
            lo_full = tl.maximum(lo_full, lo)
            hi_full = tl.minimum(hi_full, q_end // BLOCK_M * BLOCK_M)
            whole = _within_one_sequence(seg_ptr, start_n, BLOCK_N, seqlen_k, 1) & IS_CAUSAL
            ragged_k = ragged_k | (whole == 0)
        if PAD_Q:
            # causal self-attention with key padding: padded query rows give zeros (lse = -inf,
            # so P = 0 there); only the blocks holding kept rows are visited
            kept_rows_lo = kept_lo // BLOCK_M * BLOCK_M
            kept_rows_hi = tl.minimum((kept_hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M, seqlen_q)
            lo = tl.maximum(lo, kept_rows_lo)
            lo_full = tl.maximum(lo_full, lo)
            hi_full = tl.minimum(hi_full, kept_rows_hi // BLOCK_M * BLOCK_M)
            q_end = tl.minimum(q_end, kept_rows_hi)
        if HAS_WINDOW:
            # causal sliding window: key j is seen by queries i < j - causal_offset + window,
            # and every block is masked
            q_end = tl.minimum(q_end, tl.maximum(start_n + BLOCK_N - 1 - causal_offset + window, 0))
            lo_full = q_end
            hi_full = q_end
        lo_full = tl.where(ragged_k, q_end, lo_full)
        hi_full = tl.where(ragged_k, q_end, hi_full)
        # a key block outside the kept keys gets dK = dV = 0 without visiting any query
        skip = (start_n >= kept_hi) | (start_n + BLOCK_N <= kept_lo)
        n_heads = tl.where(skip, 0, HEADS_PER_PART)

        for g in range(n_heads):
            h = h_kv * GROUP + part * HEADS_PER_PART + g
            bh = b64 * num_heads_q + h
            q_base = Q + b64 * stride_qb + h * stride_qh
            do_base = DO + b64 * stride_dob + h * stride_doh
            lse_base = LSE + bh.to(tl.int64) * seqlen_q
            delta_base = Delta + bh.to(tl.int64) * seqlen_q
            # stage 0: the diagonal band (masked); 1: the rows below it that see the whole
            # key block; 2: the ragged last query block (masked). A ragged key block is
            # masked whole: stage 0 then spans every row (lo_full = hi_full = q_end above)
            for stage in tl.static_range(3):
                dk, dv, dk1, dv1 = _attn_bwd_dkdv_inner(
                    dk,
                    dv,
                    dk1,
                    dv1,
                    k,
                    v,
                    k1,
                    v1,
                    q_base,
                    do_base,
                    lse_base,
                    delta_base,
                    kpm_ptr,
                    seg_ptr,
                    lo if stage == 0 else (lo_full if stage == 1 else tl.maximum(hi_full, lo_full)),
                    lo_full if stage == 0 else (hi_full if stage == 1 else q_end),
                    start_n,
                    tl.arange(0, BLOCK_N),
                    offs_d,
                    offs_d1,
                    stride_qm,
                    stride_qd,
                    stride_dom,
                    stride_dod,
                    seqlen_q,
                    keys_end,
                    causal_offset,
                    window,
                    qk_scale,
                    softcap,
                    dropout_p,
                    seed,
                    bh,
                    HEAD_DIM,
                    BLOCK_M,
                    BLOCK_D,
                    SPLIT_D,
                    stage != 1,
                    IS_CAUSAL,
                    READ_KPM,
                    HAS_SEG,
                    HAS_WINDOW,
                    HAS_DROPOUT,
                    UPCAST,
                    DOT_PRECISION,
                    GRADS,
                    HAS_SOFTCAP,
                )

        dk = dk * sm_scale
        dk1 = dk1 * sm_scale
        if HAS_DROPOUT:
            dv = dv * (1.0 / (1.0 - dropout_p))
            dv1 = dv1 * (1.0 / (1.0 - dropout_p))
        part_off = part.to(tl.int64) * stride_part
        dk_rows = DK + part_off + b64 * stride_dkb + h_kv * stride_dkh + rows_n * stride_dkn
        dv_rows = DV + part_off + b64 * stride_dvb + h_kv * stride_dvh + rows_n * stride_dvn
        if GRADS & 2:
            tl.store(
                dk_rows + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask
            )
            if SPLIT_D:
                tl.store(
                    dk_rows + offs_d1[None, :] * stride_dkd,
                    dk1.to(DK.dtype.element_ty),
                    mask=kv1_mask,
                )
        if GRADS & 1:
            tl.store(
                dv_rows + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask
            )
            if SPLIT_D:
                tl.store(
                    dv_rows + offs_d1[None, :] * stride_dvd,
                    dv1.to(DV.dtype.element_ty),
                    mask=kv1_mask,
                )


@triton.jit
def _attn_bwd_dq_inner(
    dq,
    dq1,
    q,
    q1,
    do,
    do1,
    lse2,
    delta,
    K,
    V,
    kpm_ptr,
    seg_ptr,
    lo,
    hi,
    start_m,
    offs_m,
    offs_d,
    offs_d1,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    seqlen_q,
    seqlen_k,
    causal_offset,
    window,
    qk_scale,
    softcap,
    dropout_p,
    seed,
    bh,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_D: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    d_mask = offs_d < HEAD_DIM
    keep_scale = 1.0 / (1.0 - dropout_p)  # dropout: kept entries of dP scale up
    arange_n = tl.arange(0, BLOCK_N)
    k_ptrs = K + arange_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + arange_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd
    # SPLIT_D: the head dim's second chunk (configs.head_dim_chunks)
    d1_mask = offs_d1 < HEAD_DIM
    k1_ptrs = K + arange_n[:, None].to(tl.int64) * stride_kn + offs_d1[None, :] * stride_kd
    v1_ptrs = V + arange_n[:, None].to(tl.int64) * stride_vn + offs_d1[None, :] * stride_vd
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + arange_n
        if MASKED:
            kv_mask = (cols[:, None] < seqlen_k) & d_mask[None, :]
            kv1_mask = (cols[:, None] < seqlen_k) & d1_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
            kv1_mask = d1_mask[None, :]
        # 64-bit: start_n * stride_kn passes 2^31 once one batch element spans 2^31 elements
        k_off = start_n.to(tl.int64) * stride_kn
        v_off = start_n.to(tl.int64) * stride_vn
        k = tl.load(k_ptrs + k_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + v_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SPLIT_D:
            k1 = tl.load(k1_ptrs + k_off, mask=kv1_mask, other=0.0)
            v1 = tl.load(v1_ptrs + v_off, mask=kv1_mask, other=0.0)
            if UPCAST:
                k1 = k1.to(tl.float32)
                v1 = v1.to(tl.float32)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
        p, dcap = _recompute_p(
            qk,
            lse2,
            offs_m,
            cols,
            kpm_ptr,
            seg_ptr,
            seqlen_q,
            seqlen_k,
            causal_offset,
            window,
            qk_scale,
            softcap,
            MASKED,
            IS_CAUSAL,
            HAS_KPM,
            HAS_SEG,
            HAS_WINDOW,
            HAS_SOFTCAP,
        )
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if SPLIT_D:
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(
                seed, bh, start_m, start_n, dropout_p, offs_m.shape[0], BLOCK_N, False
            )
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:  # through the cap: d(softcap tanh(x / softcap)) = 1 - tanh^2
            ds = ds * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        if SPLIT_D:
            dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=DOT_PRECISION)
    return dq, dq1


@triton.jit(do_not_specialize=["seed_offset"])
def attn_bwd_dq_kernel(
    Q,
    K,
    V,
    Out,
    DO,
    LSE,
    DLSE,
    Delta,
    DQ,
    KPM,
    Seg,
    Seed,
    qk_scale,
    sm_scale,
    dropout_p,
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
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_kpm_b,
    stride_seg_b,
    num_heads_q,
    seqlen_q,
    seqlen_k,
    window,
    shift,
    seed_offset,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    SPLIT_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAD_Q: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    KEY_LENGTHS: tl.constexpr,
):
    n_blocks_m = tl.cdiv(seqlen_q, BLOCK_M)
    # causal: the last query blocks see the most keys; each program pairs one with a light one
    bh, first, n_turns = _program_blocks(n_blocks_m, IS_CAUSAL, True)
    # 64-bit offsets: a head, a row or a batch element may lie past 2^31 elements
    b64 = (bh // num_heads_q).to(tl.int64)
    h = (bh % num_heads_q).to(tl.int64)
    h_kv = h // GROUP
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed) + seed_offset  # op._seed_args
    offs_d = tl.arange(0, BLOCK_D)
    # SPLIT_D: the head dim's second chunk, columns [BLOCK_D, BLOCK_D + BLOCK_D1); without it
    # its tiles are never loaded and its accumulator (zeros, never updated) folds away
    offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
    row_base = bh.to(tl.int64) * seqlen_q
    k_base = K + b64 * stride_kb + h_kv * stride_kh
    v_base = V + b64 * stride_vb + h_kv * stride_vh
    kpm_ptr = KPM + b64 * stride_kpm_b
    kept_lo, kept_hi, keys_end = _kept_key_range(kpm_ptr, seqlen_k, HAS_KPM, KEY_LENGTHS)
    READ_KPM: tl.constexpr = HAS_KPM and not KEY_LENGTHS  # the inner loops read the mask
    seg_ptr = Seg + b64 * stride_seg_b
    # bottom-right causal alignment; shift > 0 moves the diagonal right (op._diagonal: a
    # bidirectional sliding window is a causal one with its diagonal moved)
    causal_offset = seqlen_k - seqlen_q + shift
    for turn in range(n_turns):
        start_m = _turn_block(first, turn, n_blocks_m) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m[:, None].to(tl.int64)
        row_ok = offs_m < seqlen_q
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        mask1 = row_ok[:, None] & (offs_d1[None, :] < HEAD_DIM)
        do_rows = DO + b64 * stride_dob + h * stride_doh + rows * stride_dom
        o_rows = Out + b64 * stride_ob + h * stride_oh + rows * stride_om
        q_rows = Q + b64 * stride_qb + h * stride_qh + rows * stride_qm
        do = tl.load(do_rows + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
        o = tl.load(o_rows + offs_d[None, :] * stride_od, mask=mask, other=0.0)
        # delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i), the softmax-backward correction term.
        # The lse output adds d lse_i / d s_ij = p_ij, i.e. dS = P * (dP - delta + dlse): fold it
        # into delta (natural-log units, as dP; only the recomputation of P uses log2).
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        do1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=do.dtype)
        q1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=do.dtype)
        if SPLIT_D:
            do1 = tl.load(do_rows + offs_d1[None, :] * stride_dod, mask=mask1, other=0.0)
            o1 = tl.load(o_rows + offs_d1[None, :] * stride_od, mask=mask1, other=0.0)
            delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), axis=1)
            q1 = tl.load(q_rows + offs_d1[None, :] * stride_qd, mask=mask1, other=0.0)
        if HAS_DLSE:
            delta -= tl.load(DLSE + row_base + offs_m, mask=row_ok, other=0.0)
        # the dK/dV pass, launched after this one, reads it
        tl.store(Delta + row_base + offs_m, delta, mask=row_ok)
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            q1 = q1.to(tl.float32)
            do1 = do1.to(tl.float32)
        lse2 = _load_lse2(LSE + row_base, offs_m, seqlen_q)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        lo, hi_full, hi = _key_bounds(
            start_m,
            seqlen_q,
            keys_end,
            causal_offset,
            kept_lo,
            kept_hi,
            seg_ptr,
            window,
            BLOCK_M,
            BLOCK_N,
            IS_CAUSAL,
            HAS_SEG,
            PAD_Q,
            HAS_WINDOW,
        )

        # stage 0: whole key blocks that need no mask; stage 1: the causal diagonal band and the
        # ragged end of the keys, masked
        for stage in tl.static_range(2):
            dq, dq1 = _attn_bwd_dq_inner(
                dq,
                dq1,
                q,
                q1,
                do,
                do1,
                lse2,
                delta,
                k_base,
                v_base,
                kpm_ptr,
                seg_ptr,
                lo if stage == 0 else hi_full,
                hi_full if stage == 0 else hi,
                start_m,
                offs_m,
                offs_d,
                offs_d1,
                stride_kn,
                stride_kd,
                stride_vn,
                stride_vd,
                seqlen_q,
                keys_end,
                causal_offset,
                window,
                qk_scale,
                softcap,
                dropout_p,
                seed,
                bh,
                HEAD_DIM,
                BLOCK_N,
                BLOCK_D,
                SPLIT_D,
                stage == 1,
                IS_CAUSAL,
                READ_KPM,
                HAS_SEG,
                HAS_WINDOW,
                HAS_DROPOUT,
                UPCAST,
                DOT_PRECISION,
                HAS_SOFTCAP,
            )
        dq_rows = DQ + b64 * stride_dqb + h * stride_dqh + rows * stride_dqm
        dq = dq * sm_scale
        tl.store(dq_rows + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask)
        if SPLIT_D:
            dq1 = dq1 * sm_scale
            tl.store(
                dq_rows + offs_d1[None, :] * stride_dqd, dq1.to(DQ.dtype.element_ty), mask=mask1
            )
