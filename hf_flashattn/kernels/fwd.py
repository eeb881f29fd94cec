"""FlashAttention-2 forward in Triton.

One program owns BLOCK_M query rows of one (batch, query head) and streams the K/V blocks of
the matching K/V head (GQA: ``kv_head = q_head // GROUP``, K/V are never copied). Softmax is
online with a running max ``m_i`` and sum ``l_i``; the division by ``l_i`` is deferred to the
end. Scores live in the log2 domain (``qk_scale = scale * log2(e)``) so the inner loop uses
exp2. The K/V range is split in two stages: blocks that need no mask run without one, and the
few blocks on the causal diagonal or the ragged end of the sequence apply it.
"""

import triton
import triton.language as tl


@triton.jit
def _program_blocks(n_blocks, PAIRED: tl.constexpr, HEAVY_LAST: tl.constexpr):
    # One grid axis, blocks fastest: axis 1 would cap batch * heads at 65,535. Returns
    # (batch * heads index, first block, number of blocks) of this program.
    # PAIRED (causal): block costs fall linearly along the sequence, and a launch of a few waves
    # ends on its heaviest programs (the GQA dK/dV pass has 1/GROUP of the programs, so few
    # waves). So program i takes the pair (i, n - 1 - i), heaviest first: every program does the
    # same work. With an odd count the middle block is alone.
    pid = tl.program_id(0)
    if PAIRED:
        n_programs = (n_blocks + 1) // 2
        bh = pid // n_programs
        pair = pid % n_programs
        n_turns = tl.where(n_blocks - 1 - pair == pair, 1, 2)
        if HEAVY_LAST:
            first = n_blocks - 1 - pair
        else:
            first = pair
    else:
        bh = pid // n_blocks
        first = pid % n_blocks
        n_turns = 1
    return bh, first, n_turns


@triton.jit
def _turn_block(first, turn, n_blocks):
    # turn 0: the first block; turn 1: its partner n - 1 - first
    return first + turn * (n_blocks - 1 - 2 * first)


@triton.jit
def _kept_key_range(
    kpm_ptr, seqlen_k, HAS_KPM: tl.constexpr, KEY_LENGTHS: tl.constexpr, SCAN: tl.constexpr = 1024
):
    # (first kept key, last kept key + 1, where the key loops end) for one row of the key
    # padding mask; (seqlen_k, 0, seqlen_k) when nothing is kept, (0, seqlen_k, seqlen_k)
    # without a mask. Keys outside the kept range are all masked, so their blocks need no work:
    # padded batches (a padding collator's right padding, generation's left padding) skip them.
    # Once per program: it does not depend on the block.
    # KEY_LENGTHS: ``kpm_ptr`` points at the row's key count instead (keys [0, count) kept),
    # read at once: the scan cost the LLaMA-0.5B layer's forward 19% and its dQ pass 23%
    # (H200, benchmarks/NOTES.md twenty-second session). The loops then end at the count:
    # masking past it (as a sequence's own end is masked, in the last block only) is the whole
    # mask, and no block reads one; reading it in every block cost the padded LLaMA-0.5B
    # layer's forward 6% and GPT-2's 17%.
    if KEY_LENGTHS:
        first = seqlen_k * 0
        end = tl.minimum(tl.maximum(tl.load(kpm_ptr), 0), seqlen_k)
        keys_end = end
    elif HAS_KPM:
        first = seqlen_k
        end = seqlen_k * 0
        for start in range(0, seqlen_k, SCAN):
            cols = start + tl.arange(0, SCAN)
            kept = tl.load(kpm_ptr + cols, mask=cols < seqlen_k, other=0) != 0
            first = tl.minimum(first, tl.min(tl.where(kept, cols, seqlen_k), 0))
            end = tl.maximum(end, tl.max(tl.where(kept, cols + 1, 0), 0))
        keys_end = seqlen_k
    else:
        first = seqlen_k * 0
        end = seqlen_k
        keys_end = seqlen_k
    return first, end, keys_end


@triton.jit
def _segment_span(seg_ptr, first, count, seqlen):
    # Packed sequences: ``seg_ptr`` holds, for each token of one batch row, the start of its
    # sequence, then (at + seqlen) the end. Tokens [first, first + count) of the row attend
    # only within [start of the first one's sequence, end of the last one's): a query block
    # visits those keys, a key block those queries (the same rule read the other way).
    last = tl.minimum(first + count, seqlen) - 1
    return tl.load(seg_ptr + first), tl.load(seg_ptr + seqlen + last)


@triton.jit
def _within_one_sequence(seg_ptr, first, count, seqlen, ALIGN: tl.constexpr):
    # Packed sequences: whether tokens [first, first + count) of the row all belong to the
    # sequence of ``first``, and that sequence starts on a multiple of ALIGN (the other side's
    # block), so the blocks of the other side from its start to the diagonal hold only its own
    # tokens and need no sequence mask. One packed sequence per row (plain causal batches, as
    # compiled models without a cache get them) is thus masked only on the diagonal.
    start = tl.load(seg_ptr + first)
    end = tl.load(seg_ptr + seqlen + first)
    return (end >= tl.minimum(first + count, seqlen)) & (start % ALIGN == 0)


@triton.jit
def _visible(
    rows, cols, limit, causal_offset, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr
):
    # Which (query row, key column) pairs attend, from broadcastable index tensors (the dK/dV
    # pass gives them transposed): keys before ``limit``, then bottom-right causality (query i
    # sees keys j <= i + causal_offset) and the sliding window (keys j > i + causal_offset -
    # window). Packed sequences and key padding are masked by the callers that have them.
    valid = cols < limit
    if IS_CAUSAL:
        valid = valid & (cols <= rows + causal_offset)
    if HAS_WINDOW:
        valid = valid & (cols > rows + causal_offset - window)
    return valid


@triton.jit
def _key_bounds(
    start_m,
    seqlen_q,
    seqlen_k,
    causal_offset,
    kept_lo,
    kept_hi,
    seg_ptr,
    window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    PAD_Q: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    # The key blocks a query block [start_m, start_m + BLOCK_M) visits, for the forward and the
    # dQ pass: [lo, hi_full) whole blocks every row sees (no causal or length mask), then
    # [hi_full, hi) the causal diagonal band and the ragged end, all within the kept keys
    # [kept_lo, kept_hi). Bottom-right causal alignment: query i sees keys j <= i + causal_offset.
    # Packed sequences: the kept keys are the block's sequences', and every block is masked (a
    # sequence's edge may cut any) unless the block's rows are all of one causal sequence that
    # starts on a key block (then only its diagonal band is). PAD_Q (causal self-attention with
    # key padding): the rows are the keys' tokens, padded rows give zeros, so a block of padded
    # rows visits nothing. HAS_WINDOW (causal sliding window): query i sees keys
    # j > i + causal_offset - window too, so the blocks start at the first row's window, and
    # every block is masked.
    if HAS_SEG:
        kept_lo, kept_hi = _segment_span(seg_ptr, start_m, BLOCK_M, seqlen_q)
    if IS_CAUSAL:
        # keys visible to every row of the block / to at least one row of it
        hi_full = tl.minimum(start_m + causal_offset + 1, seqlen_k)
        hi = tl.minimum(start_m + BLOCK_M + causal_offset, seqlen_k)
    else:
        hi_full = seqlen_k
        hi = seqlen_k
    hi_full = tl.maximum(hi_full, 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, 0)
    lo = kept_lo // BLOCK_N * BLOCK_N
    hi = tl.minimum(hi, kept_hi)
    hi_full = tl.maximum(tl.minimum(hi_full, (kept_hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N), lo)
    if HAS_SEG:
        whole = _within_one_sequence(seg_ptr, start_m, BLOCK_M, seqlen_q, BLOCK_N) & IS_CAUSAL
        hi_full = tl.where(whole, hi_full, lo)
    if HAS_WINDOW:
        first_key = tl.maximum(start_m + causal_offset - window + 1, 0)
        lo = tl.maximum(lo, first_key // BLOCK_N * BLOCK_N)
        hi = tl.maximum(hi, lo)
        hi_full = lo
    if PAD_Q:
        padded = (start_m >= kept_hi) | (start_m + BLOCK_M <= kept_lo)
        hi = tl.where(padded, lo, hi)
        hi_full = tl.where(padded, lo, hi_full)
    return lo, hi_full, hi


@triton.jit
def _segment_mask(seg_ptr, rows, cols, seqlen, TRANSPOSED: tl.constexpr):
    # Packed sequences: query row i sees only keys of its own sequence, [start_i, end_i). A
    # [len(rows), len(cols)] tile, or its transpose (the dK/dV pass's orientation).
    row_ok = rows < seqlen
    start = tl.load(seg_ptr + rows, mask=row_ok, other=0)
    end = tl.load(seg_ptr + seqlen + rows, mask=row_ok, other=0)
    # one return: Triton 3.6 checks every return's type, even one a constexpr branch skips
    if TRANSPOSED:
        inside = (cols[:, None] >= start[None, :]) & (cols[:, None] < end[None, :])
    else:
        inside = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
    return inside


@triton.jit
def _swap_if(swap: tl.constexpr, a, b):
    # (b, a) if swap else (a, b); one return (Triton 3.6 checks every return's type)
    if swap:
        first, second = b, a
    else:
        first, second = a, b
    return first, second


@triton.jit
def _dropout_keep(
    seed,
    bh,
    row_start,
    col_start,
    dropout_p,
    M: tl.constexpr,
    N: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    # The keep-mask of the probabilities at query rows row_start + arange(M) and key columns
    # col_start + arange(N) (both starts multiples of 16, M and N too): a [M, N] tile, or its
    # transpose (the dK/dV pass's (key, query) orientation). Each element gets its own 8-bit
    # draw, kept when the draw is >= dropout_p * 256 (the host rounds dropout_p to a multiple
    # of 1/256: op.applied_dropout_rate). One Philox-4x32-7 call (FlashAttention-2's draw: 7
    # rounds, bytes) gives sixteen draws, laid out on the tensor cores' accumulator fragment:
    # write a row as 16 r1 + 8 r2 + 2 r3 + r4 (r2, r4 bits) and a column likewise as
    # 16 c1 + 8 c2 + 2 c3 + c4; the call with counter (4 c1 + c3, 4 r1 + r3, batch * heads_q +
    # head, 0) under the key ``seed`` serves rows {r, r+1, r+8, r+9} x columns {c, c+1, c+8,
    # c+9}: element (r2, r4, c2, c4) gets byte 2 c2 + c4 of value 2 r2 + r4. An MMA
    # accumulator's thread holds rows {i, i+8} and columns {2j, 2j+1} (+8, +16, ...), whichever
    # operand is the query, so two threads share each call in every pass, and the mask is
    # drawn in the dot's own layout: no layout conversion (drawing sixteen adjacent columns
    # took three 32-bit conversions and one of the mask per block, and a transpose in the
    # dK/dV pass). Unique for every element of a (batch, heads, seq_q, seq_k) tensor (no 32-bit
    # row * seq_k + col that wraps), and any kernel regenerates the forward's mask from
    # (row, col) alone.
    rq = (row_start // 4 + tl.arange(0, M // 4)).to(tl.uint32)  # 4 r1 + r3
    ck = (col_start // 4 + tl.arange(0, N // 4)).to(tl.uint32)  # 4 c1 + c3
    # the tile's leading axis is the rows', or the columns' when TRANSPOSED
    lead, trail = _swap_if(TRANSPOSED, rq, ck)
    zero = tl.zeros([lead.shape[0], trail.shape[0]], dtype=tl.uint32)
    rows, cols = _swap_if(TRANSPOSED, zero + lead[:, None], zero + trail[None, :])
    r0, r1, r2, r3 = tl.philox(seed, cols, rows, zero + bh.to(tl.uint32), zero, 7)
    # [lead 1, lead 2, lead 3, lead 4, trail 1, trail 2, trail 3, trail 4]
    split: tl.constexpr = [lead.shape[0] // 4, 1, 4, 1, trail.shape[0] // 4, 1, 4, 1]
    r0 = tl.reshape(r0, split)
    r1 = tl.reshape(r1, split)
    r2 = tl.reshape(r2, split)
    r3 = tl.reshape(r3, split)
    two = tl.arange(0, 2)
    pair = 2 * two[:, None] + two[None, :]  # (bit 3, bit 0) of an index -> 0..3
    value, byte = _swap_if(
        TRANSPOSED,
        tl.reshape(pair, [1, 2, 1, 2, 1, 1, 1, 1]),  # a row's (r2, r4) picks the word
        tl.reshape(pair, [1, 1, 1, 1, 1, 2, 1, 2]),  # a column's (c2, c4) the byte in it
    )
    word = tl.where(value < 2, tl.where(value < 1, r0, r1), tl.where(value < 3, r2, r3))
    bits = (word >> (byte * 8).to(tl.uint32)) & 0xFF
    bits = tl.reshape(bits, [lead.shape[0] * 4, trail.shape[0] * 4])
    return bits >= tl.cast(dropout_p * 256.0 + 0.5, tl.uint32)


@triton.jit
def _load_kv_tile(ptrs, cols, seqlen_k, col_mask, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """One K or V tile (one head-dim chunk) of the forward's key loop: the key rows checked
    only in MASKED blocks, columns past the head dim read as zeros."""
    if MASKED:
        tile = tl.load(ptrs, mask=(cols[:, None] < seqlen_k) & col_mask[None, :], other=0.0)
    else:
        tile = tl.load(ptrs, mask=col_mask[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _softcapped(qk, qk_scale, softcap):
    """Logit soft-capping (Gemma 2): the raw scores S = Q K^T as softcap * tanh(S * scale /
    softcap), in the kernels' log2 units (times log2 e), and the tanh itself, whose 1 - t^2 the
    backward's dS takes. tanh from exp2 (1 - 2 / (e^2y + 1): exact at both ends, +-1 past
    overflow), not libdevice's, which the interpreter lacks."""
    t = 1.0 - 2.0 / (tl.math.exp2(qk * (2.0 * qk_scale / softcap)) + 1.0)
    return t * (softcap * 1.4426950408889634), t


@triton.jit
def _attn_fwd_inner(
    acc,
    acc1,
    l_i,
    m_i,
    q,
    q1,
    k_ptrs,
    v_ptrs,
    k1_ptrs,
    v1_ptrs,
    kpm_ptr,
    seg_ptr,
    start_m,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    causal_offset,
    window,
    qk_scale,
    softcap,
    dropout_p,
    seed,
    bh,
    stride_kn,
    stride_vn,
    offs_m,
    offs_n,
    offs_d,
    offs_d1,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_D: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SCALE_POSITIVE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    d_mask = offs_d < HEAD_DIM
    d1_mask = offs_d1 < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # 64-bit: start_n * stride_kn passes 2^31 once one batch element spans 2^31 elements
        k_off = start_n.to(tl.int64) * stride_kn
        v_off = start_n.to(tl.int64) * stride_vn
        k = _load_kv_tile(k_ptrs + k_off, cols, seqlen_k, d_mask, MASKED, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SPLIT_D:  # the head dim's second chunk (configs.head_dim_chunks)
            k1 = _load_kv_tile(k1_ptrs + k_off, cols, seqlen_k, d1_mask, MASKED, UPCAST)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
        # Unmasked blocks (most of them) scale inside the exponent, one FMA an element, and
        # max(S) * scale is the scaled max when the scale is positive. Masked blocks scale
        # first (-inf times a zero scale would be NaN).
        FUSED: tl.constexpr = SCALE_POSITIVE and not MASKED and not HAS_KPM and not HAS_SOFTCAP
        if HAS_SOFTCAP:
            qk, _ = _softcapped(qk, qk_scale, softcap)
        elif not FUSED:
            qk = qk * qk_scale
        # -- mask: sequence end, causal diagonal and packed sequences only in the MASKED stage
        if MASKED:
            valid = _visible(
                offs_m[:, None],
                cols[None, :],
                seqlen_k,
                causal_offset,
                window,
                IS_CAUSAL,
                HAS_WINDOW,
            )
            if HAS_SEG:
                valid = valid & _segment_mask(seg_ptr, offs_m, cols, seqlen_q, False)
            qk = tl.where(valid, qk, float("-inf"))
        if HAS_KPM:
            keep_col = tl.load(kpm_ptr + cols, mask=cols < seqlen_k, other=0)
            qk = tl.where(keep_col[None, :] != 0, qk, float("-inf"))
        # -- update m_i; a row that has seen only masked keys keeps m = -inf, so subtract 0
        if FUSED:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if SPLIT_D:
            acc1 = acc1 * alpha[:, None]
        if HAS_DROPOUT:
            # kept probabilities unscaled: the 1 / (1 - dropout_p) multiplies the output once
            keep = _dropout_keep(
                seed, bh, start_m, start_n, dropout_p, offs_m.shape[0], BLOCK_N, False
            )
            p = tl.where(keep, p, 0.0)
        v = _load_kv_tile(v_ptrs + v_off, cols, seqlen_k, d_mask, MASKED, UPCAST)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if SPLIT_D:
            v1 = _load_kv_tile(v1_ptrs + v_off, cols, seqlen_k, d1_mask, MASKED, UPCAST)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, acc1, l_i, m_i


@triton.jit(do_not_specialize=["seed_offset"])
def attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    KPM,
    Seg,
    Seed,
    qk_scale,
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
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PAD_Q: tl.constexpr,
    SCALE_POSITIVE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    KEY_LENGTHS: tl.constexpr,
):
    n_blocks_m = tl.cdiv(seqlen_q, BLOCK_M)
    # causal: the last query blocks see the most keys; each program pairs one with a light one
    bh, first, n_turns = _program_blocks(n_blocks_m, IS_CAUSAL, True)
    # 64-bit offsets: a head, a row or a batch element may lie past 2^31 elements
    b = (bh // num_heads_q).to(tl.int64)
    h = (bh % num_heads_q).to(tl.int64)
    h_kv = h // GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    # SPLIT_D: the head dim's second chunk, columns [BLOCK_D, BLOCK_D + BLOCK_D1); without it
    # its tiles are never loaded and its accumulator (zeros, never updated) folds away
    offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
    d1_mask = offs_d1 < HEAD_DIM
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed) + seed_offset  # op._seed_args
    k_rows = K + b * stride_kb + h_kv * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn
    v_rows = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn
    k_ptrs = k_rows + offs_d[None, :] * stride_kd
    v_ptrs = v_rows + offs_d[None, :] * stride_vd
    k1_ptrs = k_rows + offs_d1[None, :] * stride_kd
    v1_ptrs = v_rows + offs_d1[None, :] * stride_vd
    kpm_ptr = KPM + b * stride_kpm_b
    kept_lo, kept_hi, keys_end = _kept_key_range(kpm_ptr, seqlen_k, HAS_KPM, KEY_LENGTHS)
    READ_KPM: tl.constexpr = HAS_KPM and not KEY_LENGTHS  # the inner loops read the mask
    seg_ptr = Seg + b * stride_seg_b
    # bottom-right causal alignment; shift > 0 moves the diagonal right (op._diagonal: a
    # bidirectional sliding window is a causal one with its diagonal moved)
    causal_offset = seqlen_k - seqlen_q + shift
    for turn in range(n_turns):
        start_m = _turn_block(first, turn, n_blocks_m) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < seqlen_q
        rows64 = offs_m.to(tl.int64)
        q_rows = Q + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qm
        q = tl.load(
            q_rows + offs_d[None, :] * stride_qd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        q1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=q.dtype)
        if SPLIT_D:
            q1 = tl.load(
                q_rows + offs_d1[None, :] * stride_qd,
                mask=row_mask[:, None] & d1_mask[None, :],
                other=0.0,
            )
        if UPCAST:
            q = q.to(tl.float32)
            q1 = q1.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)

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
        # stage 0: whole blocks that need no mask; stage 1: the causal diagonal band and the
        # ragged end of the keys, masked
        for stage in tl.static_range(2):
            acc, acc1, l_i, m_i = _attn_fwd_inner(
                acc,
                acc1,
                l_i,
                m_i,
                q,
                q1,
                k_ptrs,
                v_ptrs,
                k1_ptrs,
                v1_ptrs,
                kpm_ptr,
                seg_ptr,
                start_m,
                lo if stage == 0 else hi_full,
                hi_full if stage == 0 else hi,
                seqlen_q,
                keys_end,
                causal_offset,
                window,
                qk_scale,
                softcap,
                dropout_p,
                seed,
                bh,
                stride_kn,
                stride_vn,
                offs_m,
                offs_n,
                offs_d,
                offs_d1,
                HEAD_DIM,
                BLOCK_N,
                BLOCK_D,
                SPLIT_D,
                stage == 1,
                IS_CAUSAL,
                READ_KPM,
                HAS_SEG,
                HAS_DROPOUT,
                UPCAST,
                DOT_PRECISION,
                SCALE_POSITIVE,
                HAS_WINDOW,
                HAS_SOFTCAP,
            )

        # -- epilogue: one division per row; rows with nothing to attend give 0 and lse = -inf
        empty = l_i == 0.0
        if PAD_Q:  # padded rows too (the backward then gives them P = 0)
            if KEY_LENGTHS:
                row_kept = offs_m < kept_hi
            else:
                row_kept = tl.load(kpm_ptr + offs_m, mask=row_mask, other=0) != 0
            empty = empty | (row_kept == 0)
            acc = tl.where(row_kept[:, None], acc, 0.0)
            acc1 = tl.where(row_kept[:, None], acc1, 0.0)
        denom = tl.where(empty, 1.0, l_i)[:, None]
        acc = acc / denom
        acc1 = acc1 / denom
        if HAS_DROPOUT:
            acc = acc * (1.0 / (1.0 - dropout_p))
            acc1 = acc1 * (1.0 / (1.0 - dropout_p))
        lse = tl.where(
            empty,
            float("-inf"),
            (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453,
        )
        tl.store(LSE + bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=row_mask)
        o_rows = Out + b * stride_ob + h * stride_oh + rows64[:, None] * stride_om
        tl.store(
            o_rows + offs_d[None, :] * stride_od,
            acc.to(Out.dtype.element_ty),
            mask=row_mask[:, None] & d_mask[None, :],
        )
        if SPLIT_D:
            tl.store(
                o_rows + offs_d1[None, :] * stride_od,
                acc1.to(Out.dtype.element_ty),
                mask=row_mask[:, None] & d1_mask[None, :],
            )


@triton.jit(do_not_specialize=["seed_offset"])
def dropout_mask_kernel(
    Mask,
    Seed,
    Blocks,
    dropout_p,
    n_blocks,
    seqlen_k,
    seed_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Writes the keep-mask the kernels draw at the row blocks ``Blocks`` (int64 b: query rows
    BLOCK_M b .. BLOCK_M b + BLOCK_M - 1; BLOCK_M a multiple of 16, the rows one draw spans),
    as (batch * heads_q, n_blocks, BLOCK_M, seq_k) int8: a test-only view."""
    pid = tl.program_id(0)
    bh = pid // n_blocks
    index = pid % n_blocks
    row_start = tl.load(Blocks + index) * BLOCK_M
    seed = tl.load(Seed) + seed_offset
    offs_m = tl.arange(0, BLOCK_M)
    base = Mask + (bh.to(tl.int64) * n_blocks + index) * BLOCK_M * seqlen_k
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, row_start, start_n, dropout_p, BLOCK_M, BLOCK_N, False)
        ptrs = base + offs_m[:, None] * seqlen_k + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=cols[None, :] < seqlen_k)
