"""One fused Triton kernel for a sparse MoBA decoding step: gate, top-k and attention in one launch per layer.

A decoding step has one new query per row and query head over a KV cache of K slots. MoBA's rule for it (the
PyTorch reference is `moba_train.models.cached_attention`, itself checked against the operator over the whole
sequence): score the query against the mean key of every complete block before its own, keep the topk - 1
best, and attend those blocks plus its own block up to itself, blocks counted from the row's first real token
(left padding). The PyTorch path takes about 30 small kernels per layer and step; this is one.

One program per (row, query head): (1) the gate: q . mean for each earlier block of its KV head, in chunks,
into a small fp32 scratch row; (2) topk - 1 rounds of argmax over that row; (3) an online softmax (fp32) over
the chosen blocks' keys and the own block's, BLOCK_N keys at a time, reading keys and values in place from the
cache (any strides, unit stride along head_dim). Scores are in log2 units (exp2). The grid is B x Hq programs;
each reads topk x block_size keys and values, the memory a dense step reads over (topk x block_size) / K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GATE_CHUNK = 32      # block means scored per step of the gate
BLOCK_N = 64         # keys per step of the attention
LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(q, k_ptr, v_ptr, start, n_keys, s_kk, s_vk, offs_d, d_ok, scale2, m_i, l_i, acc,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of one query over keys start .. start + n_keys - 1 (slots of its KV head)."""
    for n0 in range(0, BLOCK_SIZE, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        kt = tl.load(k_ptr + (start + offs_n)[:, None].to(tl.int64) * s_kk + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(kt * q[None, :], axis=1) * scale2
        s = tl.where(n_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # no key seen yet: keep exp2 away from -inf - -inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        vt = tl.load(v_ptr + (start + offs_n)[:, None].to(tl.int64) * s_vk + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _moba_decode_kernel(q_ptr, k_ptr, v_ptr, means_ptr, pad_ptr, scratch_ptr, out_ptr,
                        K, D, G, Hq, scale2,
                        s_qb, s_qh, s_kb, s_kh, s_kk, s_vb, s_vh, s_vk, s_mb, s_mh, s_mn, s_ob, s_oh,
                        BLOCK_SIZE: tl.constexpr, N_EXTRA: tl.constexpr, NB: tl.constexpr, KP2: tl.constexpr,
                        GATE_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    hkv = hq // G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + hq * s_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    pad = tl.load(pad_ptr + b).to(tl.int32)
    pos = K - 1 - pad                      # the new token's position in its row's sequence
    own = pos // BLOCK_SIZE                # its block; blocks 0 .. own - 1 are complete candidates
    k_base = k_ptr + b.to(tl.int64) * s_kb + hkv.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + hkv.to(tl.int64) * s_vh

    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    if N_EXTRA > 0:
        # (1) the gate, in fp32 as the operator's: q . mean of each candidate block, into this program's scratch row
        m_base = means_ptr + b.to(tl.int64) * s_mb + hkv.to(tl.int64) * s_mh
        row = scratch_ptr + (b * Hq + hq).to(tl.int64) * NB
        for j0 in range(0, own, GATE_CHUNK):
            offs_j = j0 + tl.arange(0, GATE_CHUNK)
            j_ok = offs_j < own
            means = tl.load(m_base + offs_j[:, None] * s_mn + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :],
                            other=0.0)
            tl.store(row + offs_j, tl.sum(means * q[None, :], axis=1), mask=j_ok)
        tl.debug_barrier()
        # (2) the topk - 1 best candidates, by rounds of argmax
        offs_nb = tl.arange(0, NB)
        scores = tl.load(row + offs_nb, mask=offs_nb < own, other=float("-inf"))
        offs_k = tl.arange(0, KP2)
        chosen = tl.full([KP2], -1, tl.int32)
        for r in tl.static_range(N_EXTRA):
            best = tl.max(scores, axis=0)
            idx = tl.argmax(scores, axis=0).to(tl.int32)
            chosen = tl.where(offs_k == r, tl.where(best > float("-inf"), idx, -1), chosen)
            scores = tl.where(offs_nb == idx, float("-inf"), scores)
        # (3) attention over the chosen blocks (fewer candidates than topk - 1: the surplus slots stay -1)
        for r in tl.static_range(N_EXTRA):
            blk = tl.sum(tl.where(offs_k == r, chosen, 0), axis=0)
            n_keys = tl.where(blk >= 0, BLOCK_SIZE, 0)
            m_i, l_i, acc = _attend_block(q, k_base, v_base, pad + blk * BLOCK_SIZE, n_keys, s_kk, s_vk, offs_d,
                                          d_ok, scale2, m_i, l_i, acc, BLOCK_SIZE, BLOCK_N)
    # the own block, causally: up to the new token itself
    m_i, l_i, acc = _attend_block(q, k_base, v_base, pad + own * BLOCK_SIZE, pos - own * BLOCK_SIZE + 1, s_kk, s_vk,
                                  offs_d, d_ok, scale2, m_i, l_i, acc, BLOCK_SIZE, BLOCK_N)
    out = acc / l_i
    tl.store(out_ptr + b.to(tl.int64) * s_ob + hq * s_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def moba_decode_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, means: torch.Tensor,
                     pad_slots: torch.Tensor, block_size: int, topk: int, softmax_scale: float) -> torch.Tensor:
    """One new query per row: query [B, Hq, 1, D], the cache key/value [B, Hkv, K, D] (its last slot the new
    token's), `means` [B, Hkv, capacity, D] fp32 holding at least every complete block before each row's own
    block, `pad_slots` [B] (leading padding slots per row). Returns [B, 1, Hq, D] in the query's dtype."""
    B, Hq, S, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    if S != 1:
        raise ValueError(f"the fused MoBA decode kernel takes one new token per row, got {S}")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or means.stride(-1) != 1:
        raise ValueError("the fused MoBA decode kernel needs unit stride along head_dim")
    q = query[:, :, 0]
    out = torch.empty(B, Hq, D, dtype=query.dtype, device=query.device)
    n_extra = max(topk - 1, 0)
    candidates = max((K - 1) // block_size, 1)
    nb = triton.next_power_of_2(candidates)
    scratch = torch.empty(B * Hq * nb if n_extra else 1, dtype=torch.float32, device=query.device)
    _moba_decode_kernel[(B, Hq)](
        q, key, value, means, pad_slots, scratch, out, K, D, Hq // Hkv, Hq, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), means.stride(0), means.stride(1), means.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, N_EXTRA=n_extra, NB=nb, KP2=triton.next_power_of_2(max(n_extra, 1)),
        GATE_CHUNK=GATE_CHUNK, BLOCK_N=min(BLOCK_N, triton.next_power_of_2(block_size)),
        BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return out[:, None]


__all__ = ["moba_decode_step"]
