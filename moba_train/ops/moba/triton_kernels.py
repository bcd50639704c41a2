"""Triton kernels of MoBA attention: forward, and backward by recomputation.

Tensors are contiguous [T, H, D]; a *row* is one (token, query head): row = t * Hq + hq.
Work comes in two shapes:

* own-block tiles: consecutive tokens of one block times the G query heads of one KV head, causal
  over the keys of that block;
* pair tiles: up to BLOCK_M rows that all selected one key block (of one KV head) in the same
  *wave*. A row's selected blocks are numbered 0..n_select-1 (its slots); wave s holds every row's
  slot s, so within one launch no row appears twice and a tile can read-modify-write the row's
  running state with plain loads and stores: deterministic, no atomics.

Forward: wave 0 stores (max, sum, acc) of each row, later waves merge into it, and the own-block
kernel runs last, merges its causal part, normalizes and writes the output and the log-sum-exp.
Backward (FlashAttention-2's recomputation from the saved log-sum-exp): dq by the same waves into an
fp32 accumulator, finished by the own-block dq kernel; dk/dv by one program per (key block, key
chunk, KV head) that loops over the block's own queries and every row that selected it.

Scores live in log2 units (scale2 = softmax_scale * log2(e)) so the kernels use exp2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, rows, row_ok, offs_d, D):
    """[BLOCK_M, BLOCK_D] of a [rows, D] tensor at arbitrary (int64) row ids; zeros where masked."""
    return tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_keys(ptr, kstart, offs_n, n_ok, hkv, Hkv, offs_d, D):
    """[BLOCK_N, BLOCK_D] keys (or values) at block-local positions offs_n of KV head hkv."""
    rows = (kstart + offs_n) * Hkv + hkv
    return tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_kv(src, kstart, n0, offs_n, n_ok, hkv, Hkv, offs_d, D,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KV_DESC: tl.constexpr):
    """Keys (or values) [n0, n0 + BLOCK_N) of the block at kstart: by plain loads (zeros past n_ok), or with
    KV_DESC by a TMA copy through the [T, Hkv, D] descriptor `src` (zeros past T and past D only: keys past the
    block's end are the next block's, and the callers' masks give them no weight)."""
    if KV_DESC:
        return tl.reshape(src.load([(kstart + n0).to(tl.int32), hkv, 0]), [BLOCK_N, BLOCK_D])
    else:
        return _load_keys(src, kstart, offs_n, n_ok, hkv, Hkv, offs_d, D)


@triton.jit
def _attend(qt, k_ptr, v_ptr, kstart, n_hi, hkv, Hkv, D, scale2, q_pos, m_i, l_i, acc,
            CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
            KV_DESC: tl.constexpr):
    """Online softmax of the tile's rows over keys [0, n_hi) of the block starting at kstart.
    CAUSAL: a row at block-local position q_pos sees keys at positions <= q_pos."""
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(0, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        kt = _load_kv(k_ptr, kstart, n0, offs_n, n_ok, hkv, Hkv, offs_d, D, BLOCK_N, BLOCK_D, KV_DESC)
        vt = _load_kv(v_ptr, kstart, n0, offs_n, n_ok, hkv, Hkv, offs_d, D, BLOCK_N, BLOCK_D, KV_DESC)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale2
        allowed = n_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _pair_tile(tiles_ptr, pair_rows_ptr, tile, BLOCK_M: tl.constexpr):
    """(key block, KV head, rows, row mask) of one pair tile."""
    blk = tl.load(tiles_ptr + tile * 4 + 0)
    hkv = tl.load(tiles_ptr + tile * 4 + 1)
    first = tl.load(tiles_ptr + tile * 4 + 2)
    count = tl.load(tiles_ptr + tile * 4 + 3)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < count
    rows = tl.load(pair_rows_ptr + first + offs_m, mask=row_ok, other=0).to(tl.int64)
    return blk, hkv, rows, row_ok


@triton.jit
def _own_tile(blk, chunk, hkv, block_start_ptr, block_len_ptr, tok_per_tile, G, Hq, BLOCK_M: tl.constexpr):
    """Rows of an own-block tile: tokens [chunk * tok_per_tile, +tok_per_tile) of the block times G heads."""
    kstart = tl.load(block_start_ptr + blk).to(tl.int64)
    klen = tl.load(block_len_ptr + blk)
    r = tl.arange(0, BLOCK_M)
    q_pos = chunk * tok_per_tile + r // G
    row_ok = (r < tok_per_tile * G) & (q_pos < klen)
    rows = (kstart + q_pos) * Hq + hkv * G + r % G
    n_hi = tl.minimum(klen, (chunk + 1) * tok_per_tile)
    return kstart, n_hi, q_pos, rows, row_ok


@triton.jit(do_not_specialize=["tile_base"])
def fwd_pairs_kernel(q_ptr, k_ptr, v_ptr, acc_ptr, m_ptr, l_ptr, pair_rows_ptr, tiles_ptr, tile_base,
                     block_start_ptr, block_len_ptr, scale2, Hkv, D,
                     FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, KV_DESC: tl.constexpr):
    blk, hkv, rows, row_ok = _pair_tile(tiles_ptr, pair_rows_ptr, tile_base + tl.program_id(0), BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qt = _load_rows(q_ptr, rows, row_ok, offs_d, D)
    kstart = tl.load(block_start_ptr + blk).to(tl.int64)
    klen = tl.load(block_len_ptr + blk)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend(qt, k_ptr, v_ptr, kstart, klen, hkv, Hkv, D, scale2, offs_d, m_i, l_i, acc,
                            CAUSAL=False, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=PRECISION, KV_DESC=KV_DESC)
    if not FIRST:  # merge with the row's state from earlier waves
        m_old = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        l_old = tl.load(l_ptr + rows, mask=row_ok, other=0.0)
        acc_old = _load_rows(acc_ptr, rows, row_ok, offs_d, D)
        m_new = tl.maximum(m_old, m_i)
        a_old = tl.exp2(m_old - m_new)
        a_new = tl.exp2(m_i - m_new)
        l_i = l_old * a_old + l_i * a_new
        acc = acc_old * a_old[:, None] + acc * a_new[:, None]
        m_i = m_new
    tl.store(m_ptr + rows, m_i, mask=row_ok)
    tl.store(l_ptr + rows, l_i, mask=row_ok)
    tl.store(acc_ptr + rows[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def fwd_own_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, acc_ptr, m_ptr, l_ptr, sel_ptr,
                   block_start_ptr, block_len_ptr, scale2, Hq, Hkv, G, D, n_select, tok_per_tile, chunks_per_block,
                   blk_base, row_base,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   KV_DESC: tl.constexpr):
    """The blocks blk_base.. of one span; its state (acc, m, l) and selection hold rows from row_base on."""
    blk = blk_base + tl.program_id(0) // chunks_per_block
    chunk = tl.program_id(0) % chunks_per_block
    hkv = tl.program_id(1)
    kstart, n_hi, q_pos, rows, row_ok = _own_tile(blk, chunk, hkv, block_start_ptr, block_len_ptr, tok_per_tile,
                                                  G, Hq, BLOCK_M)
    if chunk * tok_per_tile < n_hi:
        offs_d = tl.arange(0, BLOCK_D)
        qt = _load_rows(q_ptr, rows, row_ok, offs_d, D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        m_i, l_i, acc = _attend(qt, k_ptr, v_ptr, kstart, n_hi, hkv, Hkv, D, scale2, q_pos, m_i, l_i, acc,
                                CAUSAL=True, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=PRECISION, KV_DESC=KV_DESC)
        if n_select > 0:
            # Rows that selected any block (their slot 0 is filled) carry a state from the waves.
            span_rows = rows - row_base
            has_sel = row_ok & (tl.load(sel_ptr + span_rows * n_select, mask=row_ok, other=-1) >= 0)
            m_old = tl.load(m_ptr + span_rows, mask=has_sel, other=float("-inf"))
            l_old = tl.load(l_ptr + span_rows, mask=has_sel, other=0.0)
            acc_old = _load_rows(acc_ptr, span_rows, has_sel, offs_d, D)
            m_new = tl.maximum(m_old, m_i)
            a_old = tl.exp2(m_old - m_new)
            a_new = tl.exp2(m_i - m_new)
            l_i = l_old * a_old + l_i * a_new
            acc = acc_old * a_old[:, None] + acc * a_new[:, None]
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < D))
        tl.store(lse_ptr + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, n_rows, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[row] = rowsum(dO * O) in fp32."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(out_ptr, rows, row_ok, offs_d, D).to(tl.float32)
    do = _load_rows(dout_ptr, rows, row_ok, offs_d, D).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _dq(qt, dot, lse, delta, k_ptr, v_ptr, kstart, n_hi, hkv, Hkv, D, scale2, q_pos, dq,
        CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        KV_DESC: tl.constexpr):
    """dq (unscaled) of the tile's rows from keys [0, n_hi) of one block."""
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(0, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        kt = _load_kv(k_ptr, kstart, n0, offs_n, n_ok, hkv, Hkv, offs_d, D, BLOCK_N, BLOCK_D, KV_DESC)
        vt = _load_kv(v_ptr, kstart, n0, offs_n, n_ok, hkv, Hkv, offs_d, D, BLOCK_N, BLOCK_D, KV_DESC)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale2
        allowed = n_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= q_pos[:, None])
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(dot, tl.trans(vt), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["tile_base"])
def bwd_dq_pairs_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_acc_ptr, pair_rows_ptr, tiles_ptr,
                        tile_base, block_start_ptr, block_len_ptr, scale, scale2, Hkv, D,
                        FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, KV_DESC: tl.constexpr):
    blk, hkv, rows, row_ok = _pair_tile(tiles_ptr, pair_rows_ptr, tile_base + tl.program_id(0), BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qt = _load_rows(q_ptr, rows, row_ok, offs_d, D)
    dot = _load_rows(dout_ptr, rows, row_ok, offs_d, D)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    kstart = tl.load(block_start_ptr + blk).to(tl.int64)
    klen = tl.load(block_len_ptr + blk)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq(qt, dot, lse, delta, k_ptr, v_ptr, kstart, klen, hkv, Hkv, D, scale2, offs_d, dq,
             CAUSAL=False, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=PRECISION, KV_DESC=KV_DESC) * scale
    if not FIRST:
        dq += _load_rows(dq_acc_ptr, rows, row_ok, offs_d, D)
    tl.store(dq_acc_ptr + rows[:, None] * D + offs_d[None, :], dq, mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def bwd_dq_own_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_acc_ptr, dq_ptr, sel_ptr,
                      block_start_ptr, block_len_ptr, scale, scale2, Hq, Hkv, G, D, n_select, tok_per_tile,
                      chunks_per_block, blk_base, row_base, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, KV_DESC: tl.constexpr):
    """The blocks blk_base.. of one span; its dq accumulator and selection hold rows from row_base on."""
    blk = blk_base + tl.program_id(0) // chunks_per_block
    chunk = tl.program_id(0) % chunks_per_block
    hkv = tl.program_id(1)
    kstart, n_hi, q_pos, rows, row_ok = _own_tile(blk, chunk, hkv, block_start_ptr, block_len_ptr, tok_per_tile,
                                                  G, Hq, BLOCK_M)
    if chunk * tok_per_tile < n_hi:
        offs_d = tl.arange(0, BLOCK_D)
        qt = _load_rows(q_ptr, rows, row_ok, offs_d, D)
        dot = _load_rows(dout_ptr, rows, row_ok, offs_d, D)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dq = _dq(qt, dot, lse, delta, k_ptr, v_ptr, kstart, n_hi, hkv, Hkv, D, scale2, q_pos, dq,
                 CAUSAL=True, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=PRECISION, KV_DESC=KV_DESC) * scale
        if n_select > 0:
            span_rows = rows - row_base
            has_sel = row_ok & (tl.load(sel_ptr + span_rows * n_select, mask=row_ok, other=-1) >= 0)
            dq += _load_rows(dq_acc_ptr, span_rows, has_sel, offs_d, D)
        tl.store(dq_ptr + rows[:, None] * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkv(kt, vt, offs_n, n_ok, q_ptr, dout_ptr, lse_ptr, delta_ptr, rows, row_ok, q_pos, D, scale2, dk, dv,
         CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Add one row tile's contribution to a key chunk's dk (unscaled) and dv.
    Works on transposed scores [keys, rows], so every product has the keys as its M side and no
    register tile needs a transpose (FlashAttention-2's dk/dv loop)."""
    offs_d = tl.arange(0, BLOCK_D)
    qt = _load_rows(q_ptr, rows, row_ok, offs_d, D)
    dot = _load_rows(dout_ptr, rows, row_ok, offs_d, D)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    st = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * scale2
    allowed = n_ok[:, None] & row_ok[None, :]
    if CAUSAL:
        allowed = allowed & (offs_n[:, None] <= q_pos[None, :])
    pt = tl.where(allowed, tl.exp2(st - lse[None, :]), 0.0)
    dv += tl.dot(pt.to(dot.dtype), dot, input_precision=PRECISION)
    dpt = tl.dot(vt, tl.trans(dot), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(qt.dtype), qt, input_precision=PRECISION)
    return dk, dv


@triton.jit
def bwd_dkv_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, pair_rows_ptr,
                   group_first_ptr, group_count_ptr, group_order_ptr, block_start_ptr, block_len_ptr,
                   scale, scale2, Hq, Hkv, G, D, NB, chunks_per_block,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (KV head, key block, key chunk), busiest groups first (group_order)."""
    group = tl.load(group_order_ptr + tl.program_id(0) // chunks_per_block)
    chunk = tl.program_id(0) % chunks_per_block
    hkv = group // NB
    blk = group % NB
    kstart = tl.load(block_start_ptr + blk).to(tl.int64)
    klen = tl.load(block_len_ptr + blk)
    n_lo = chunk * BLOCK_N
    if n_lo < klen:
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        n_ok = offs_n < klen
        kt = _load_keys(k_ptr, kstart, offs_n, n_ok, hkv, Hkv, offs_d, D)
        vt = _load_keys(v_ptr, kstart, offs_n, n_ok, hkv, Hkv, offs_d, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # The block's own queries at or after the chunk's first key, G heads each, causal.
        n_own = (klen - n_lo) * G
        for r0 in range(0, n_own, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            q_pos = n_lo + r // G
            rows = (kstart + q_pos) * Hq + hkv * G + r % G
            dk, dv = _dkv(kt, vt, offs_n, n_ok, q_ptr, dout_ptr, lse_ptr, delta_ptr, rows, r < n_own, q_pos, D,
                          scale2, dk, dv, CAUSAL=True, BLOCK_D=BLOCK_D, PRECISION=PRECISION)
        # Every row that selected this block, in the fixed order of the pair list.
        first = tl.load(group_first_ptr + group)
        count = tl.load(group_count_ptr + group)
        for r0 in range(0, count, BLOCK_M):
            offs_m = r0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < count
            rows = tl.load(pair_rows_ptr + first + offs_m, mask=row_ok, other=0).to(tl.int64)
            dk, dv = _dkv(kt, vt, offs_n, n_ok, q_ptr, dout_ptr, lse_ptr, delta_ptr, rows, row_ok, offs_m, D,
                          scale2, dk, dv, CAUSAL=False, BLOCK_D=BLOCK_D, PRECISION=PRECISION)
        out_rows = (kstart + offs_n) * Hkv + hkv
        mask = n_ok[:, None] & (offs_d[None, :] < D)
        tl.store(dk_ptr + out_rows[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + out_rows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)
