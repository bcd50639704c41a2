"""A sparse MoBA decoding step in three Triton launches per layer: the gate, split attention, a merge.

A decoding step has one new query per row and query head over a KV cache of K slots. MoBA's rule for it (the
PyTorch reference is `moba_train.models.cached_attention`, itself checked against the operator over the whole
sequence): score the query against the mean key of every complete block before its own, keep the topk - 1
best, and attend those blocks plus its own block up to itself, blocks counted from the row's first real token
(left padding). The PyTorch path takes about 30 small kernels per layer and step; this takes three.

Work is split as in flash-decoding, so that a batch of one still fills the GPU, and by KV head, so that the G
query heads that share a KV head read its keys once (GQA):

1. `_moba_decode_gate_kernel`, one program per (row, KV head, GATE_CHUNK candidate blocks): q . mean of each
   candidate block for the group's G query heads, fp32 as the operator's gate, into a score scratch. Spread over
   programs because one program walking every mean was the step's critical path at long contexts (256 blocks
   at 128K: 16 dependent rounds of loads in every split program of the earlier two-launch version).
2. `_moba_decode_split_kernel`, one program per (row, KV head, split). Every program of a (row, KV head) reads
   the group's scores, keeps each head's topk - 1 best blocks, and takes the union of the group's blocks plus
   the own block, in block order. Split (u, c) attends the c-th chunk of CHUNK keys of the u-th block of that
   union, for the heads that chose it (every head for the own block, causally), and writes each head's partial
   softmax state (max, sum, output).
3. `_moba_decode_merge_kernel`, one program per (row, query head): the log-sum-exp merge of its partials.

Scores are in log2 units (exp2). Splits past the end of a group's union write an empty state. One fp32
workspace holds the partial states and the scores (one allocation per step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 128          # keys per split of a block
BLOCK_N = 64         # keys per step inside a split
MERGE_SPLITS = 8     # partial states merged per step
GATE_ELEMENTS = 8192  # fp32 products per gate program (heads x means x head_dim)
LOG2E = 1.4426950408889634


@triton.jit
def _scores_of(work_ptr, N_PART, bh, G_GATE: tl.constexpr, NB: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where the gate's scores [G_GATE, NB] of (row, KV head) `bh` sit in the workspace: after the splits'
    partial states (N_PART maxima, N_PART sums, N_PART x BLOCK_D outputs)."""
    return work_ptr + N_PART.to(tl.int64) * (2 + BLOCK_D) + bh.to(tl.int64) * G_GATE * NB


@triton.jit
def _moba_decode_gate_kernel(q_ptr, means_ptr, pad_ptr, len_ptr, work_ptr, N_PART, K, D, G,
                             s_qb, s_qh, s_mb, s_mh, s_mn,
                             BLOCK_SIZE: tl.constexpr, NB: tl.constexpr, GATE_CHUNK: tl.constexpr,
                             G_GATE: tl.constexpr, BLOCK_D: tl.constexpr, HKV: tl.constexpr,
                             LEN_FROM_PTR: tl.constexpr):
    """q . mean for GATE_CHUNK candidate blocks of one (row, KV head), for the group's G query heads, in fp32
    as the operator's gate: into the workspace's scores (`_scores_of`). Candidates at or past a row's own block
    are left unwritten (the split kernel masks them)."""
    bh = tl.program_id(0)
    b = bh // HKV
    hkv = bh % HKV
    if LEN_FROM_PTR:
        K = tl.load(len_ptr).to(tl.int32)
    pad = tl.load(pad_ptr + b).to(tl.int32)
    own = (K - 1 - pad) // BLOCK_SIZE
    offs_j = tl.program_id(1) * GATE_CHUNK + tl.arange(0, GATE_CHUNK)
    j_ok = offs_j < own
    offs_gg = tl.arange(0, G_GATE)
    gg_ok = offs_gg < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_gate = tl.load(q_ptr + b.to(tl.int64) * s_qb + (hkv * G + offs_gg)[:, None] * s_qh + offs_d[None, :],
                     mask=gg_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m_base = means_ptr + b.to(tl.int64) * s_mb + hkv.to(tl.int64) * s_mh
    means = tl.load(m_base + offs_j[:, None] * s_mn + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    scores = tl.sum(q_gate[:, None, :] * means[None, :, :], axis=2)                   # [G_GATE, GATE_CHUNK]
    rows = _scores_of(work_ptr, N_PART, bh, G_GATE, NB, BLOCK_D)
    tl.store(rows + offs_gg[:, None] * NB + offs_j[None, :], scores, mask=gg_ok[:, None] & j_ok[None, :])


@triton.jit
def _moba_decode_split_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, len_ptr, work_ptr, N_PART, K, D, G, scale2,
                              s_qb, s_qh, s_kb, s_kh, s_kk, s_vb, s_vh, s_vk,
                              BLOCK_SIZE: tl.constexpr, N_EXTRA: tl.constexpr, NB: tl.constexpr,
                              CHUNKS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                              G_GATE: tl.constexpr, G_P: tl.constexpr, BLOCK_D: tl.constexpr,
                              HKV: tl.constexpr, IEEE: tl.constexpr, LEN_FROM_PTR: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // HKV
    hkv = bh % HKV
    u = split // CHUNKS                     # which block of the group's union
    c = split % CHUNKS                      # which chunk of that block
    offs_g = tl.arange(0, G_P)
    g_ok = offs_g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_rows = q_ptr + b.to(tl.int64) * s_qb + (hkv * G + offs_g)[:, None] * s_qh + offs_d[None, :]
    q = tl.load(q_rows, mask=g_ok[:, None] & d_ok[None, :], other=0.0)             # [G_P, BLOCK_D], input dtype
    if LEN_FROM_PTR:
        K = tl.load(len_ptr).to(tl.int32)
    pad = tl.load(pad_ptr + b).to(tl.int32)
    pos = K - 1 - pad                        # the new token's position in its row's sequence
    own = pos // BLOCK_SIZE                  # its block; blocks 0 .. own - 1 are complete candidates

    blk = own
    heads = g_ok
    n_union = 0
    if N_EXTRA > 0:
        # (1) the gate's scores, written by _moba_decode_gate_kernel: [G_GATE, NB] per (row, KV head)
        rows = _scores_of(work_ptr, N_PART, bh, G_GATE, NB, BLOCK_D)
        # (2) each head's topk - 1 best candidates, by rounds of argmax, on the group's G_GATE rows (not the
        # G_P rows tl.dot needs below: the [heads, NB] tiles are what grows with the context)
        offs_gg = tl.arange(0, G_GATE)
        gg_ok = offs_gg < G
        offs_nb = tl.arange(0, NB)
        scores = tl.load(rows + offs_gg[:, None] * NB + offs_nb[None, :],
                         mask=gg_ok[:, None] & (offs_nb < own)[None, :], other=float("-inf"))
        chosen = tl.zeros([G_GATE, NB], tl.int32)
        for _ in tl.static_range(N_EXTRA):
            best = tl.max(scores, axis=1)
            idx = tl.argmax(scores, axis=1)
            hit = offs_nb[None, :] == idx[:, None]
            chosen = tl.where(hit & (best > float("-inf"))[:, None] & gg_ok[:, None], 1, chosen)
            scores = tl.where(hit, float("-inf"), scores)
        # (3) the group's union in block order; this split's block is its u-th, the own block comes after it
        in_union = tl.max(chosen, axis=0)                                               # [NB]
        n_union = tl.sum(in_union, axis=0)
        rank = tl.cumsum(in_union, axis=0) - 1
        picked = (rank == u) & (in_union > 0)
        blk = tl.where(u < n_union, tl.sum(tl.where(picked, offs_nb, 0), axis=0), own)
        chose_blk = tl.max(tl.where(offs_nb[None, :] == blk, chosen, 0), axis=1)         # [G_GATE]
        # widened to the G_P rows: row g takes chose_blk[g] (rows past G_GATE take 0)
        chose_blk_p = tl.sum(tl.where(offs_g[:, None] == offs_gg[None, :], chose_blk[None, :], 0), axis=1)
        heads = tl.where(u < n_union, chose_blk_p > 0, g_ok)

    start = c * CHUNK                                    # this split's first key within its block
    n_keys = tl.where(blk == own, pos - own * BLOCK_SIZE + 1 - start, BLOCK_SIZE - start)
    n_keys = tl.where(u <= n_union, tl.minimum(n_keys, CHUNK), 0)       # splits past the union: nothing
    first = pad + blk * BLOCK_SIZE + start
    k_base = k_ptr + b.to(tl.int64) * s_kb + hkv.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + hkv.to(tl.int64) * s_vh
    m_i = tl.full([G_P], float("-inf"), tl.float32)
    l_i = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, BLOCK_D], tl.float32)
    for n0 in range(0, CHUNK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        slots = (first + offs_n).to(tl.int64)
        kt = tl.load(k_base + slots[:, None] * s_kk + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where(heads[:, None] & n_ok[None, :], s * scale2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # no key yet: keep exp2 away from -inf - -inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        vt = tl.load(v_base + slots[:, None] * s_vk + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p, vt, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    part = (bh.to(tl.int64) * n_splits + split) * G_P
    tl.store(work_ptr + part + offs_g, m_i)
    tl.store(work_ptr + N_PART.to(tl.int64) + part + offs_g, l_i)
    tl.store(work_ptr + 2 * N_PART.to(tl.int64) + (part + offs_g)[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _moba_decode_merge_kernel(work_ptr, N_PART, out_ptr, D, G, N_SPLITS, s_ob, s_oh,
                              G_P: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_SPLITS: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    hkv = hq // G
    g = hq % G
    n_kv = tl.num_programs(1) // G
    offs_d = tl.arange(0, BLOCK_D)
    base = (b * n_kv + hkv).to(tl.int64) * N_SPLITS
    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, N_SPLITS, MERGE_SPLITS):
        offs_s = s0 + tl.arange(0, MERGE_SPLITS)
        s_ok = offs_s < N_SPLITS
        at = (base + offs_s) * G_P + g
        m = tl.load(work_ptr + at, mask=s_ok, other=float("-inf"))
        l_s = tl.load(work_ptr + N_PART.to(tl.int64) + at, mask=s_ok, other=0.0)
        o = tl.load(work_ptr + 2 * N_PART.to(tl.int64) + at[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None],
                    other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(m - m_safe)                  # empty splits (m = -inf) weigh 0
        alpha = tl.exp2(m_run - m_safe)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        l_run = l_run * alpha + tl.sum(w * l_s, axis=0)
        m_run = m_new
    out = acc / l_run
    tl.store(out_ptr + b.to(tl.int64) * s_ob + hq * s_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _moba_decode_means_kernel(k_ptr, pad_ptr, len_ptr, sum_ptr, means_ptr, D,
                              s_kb, s_kh, s_kk, s_sb, s_sh, s_mb, s_mh, s_mn,
                              BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, HKV: tl.constexpr,
                              ROUND: tl.constexpr):
    """One program per (row, KV head): add the new token's key (slot length - 1) to the running fp32 sum of the
    row's open block; if it completes the block, store the block's mean (rounded to the keys' dtype when ROUND,
    the `reference` convention) and start the next sum at 0."""
    bh = tl.program_id(0)
    b = bh // HKV
    hkv = bh % HKV
    K = tl.load(len_ptr).to(tl.int32)
    filled = K - tl.load(pad_ptr + b).to(tl.int32)           # the row's real tokens, the new one included
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    key = tl.load(k_ptr + b.to(tl.int64) * s_kb + hkv.to(tl.int64) * s_kh + (K - 1).to(tl.int64) * s_kk + offs_d,
                  mask=d_ok, other=0.0)
    sums = sum_ptr + b.to(tl.int64) * s_sb + hkv * s_sh + offs_d
    total = tl.load(sums, mask=d_ok, other=0.0) + key.to(tl.float32)
    complete = (tl.zeros([BLOCK_D], tl.int32) + filled % BLOCK_SIZE) == 0          # as a vector: a store mask
    mean = tl.math.div_rn(total, tl.full([BLOCK_D], BLOCK_SIZE, tl.float32))    # IEEE, as torch divides
    if ROUND:
        mean = mean.to(k_ptr.dtype.element_ty).to(tl.float32)
    block = filled // BLOCK_SIZE - 1
    tl.store(means_ptr + b.to(tl.int64) * s_mb + hkv.to(tl.int64) * s_mh + block.to(tl.int64) * s_mn + offs_d, mean,
             mask=d_ok & complete)
    tl.store(sums, tl.where(complete, 0.0, total), mask=d_ok)


def moba_decode_means_step(key: torch.Tensor, pad_slots: torch.Tensor, length: torch.Tensor,
                           running_sum: torch.Tensor, means: torch.Tensor, block_size: int, rounded: bool) -> None:
    """After the token at slot length - 1 was appended to the cache buffers key [B, Hkv, capacity, D]: add it to
    each row's running fp32 key sum of its open block (`running_sum` [B, Hkv, D]) and, in the rows where it
    completes a block, write that block's mean into `means` [B, Hkv, blocks, D] (rounded to the keys' dtype
    when `rounded`). One launch, no host value: a CUDA graph can capture it. The sum is the operator's
    `block_means` (fp32, token after token), so the means are the ones it computes for the same sequence."""
    B, Hkv, _, D = key.shape
    if key.stride(-1) != 1 or running_sum.stride(-1) != 1 or means.stride(-1) != 1:
        raise ValueError("the block-mean update needs unit stride along head_dim")
    _moba_decode_means_kernel[(B * Hkv,)](
        key, pad_slots, length, running_sum, means, D,
        key.stride(0), key.stride(1), key.stride(2), running_sum.stride(0), running_sum.stride(1),
        means.stride(0), means.stride(1), means.stride(2),
        BLOCK_SIZE=block_size, BLOCK_D=max(16, triton.next_power_of_2(D)), HKV=Hkv, ROUND=rounded, num_warps=1)


def moba_decode_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, means: torch.Tensor,
                     pad_slots: torch.Tensor, block_size: int, topk: int, softmax_scale: float,
                     length: torch.Tensor | None = None) -> torch.Tensor:
    """One new query per row: query [B, Hq, 1, D], the cache key/value [B, Hkv, K, D] (its last slot the new
    token's), `means` [B, Hkv, capacity, D] fp32 holding at least every complete block before each row's own
    block, `pad_slots` [B] (leading padding slots per row). Returns [B, 1, Hq, D] in the query's dtype.

    `length`, a one-element int tensor on the device: the cache holds that many filled slots (the new token's
    the last of them) and key/value are its whole preallocated buffers. Launch sizes then depend on the buffers'
    capacity alone, so a CUDA graph can capture the step and replay it as the cache grows."""
    B, Hq, S, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]          # with `length`: the capacity, which bounds every launch size
    if S != 1:
        raise ValueError(f"the fused MoBA decode kernel takes one new token per row, got {S}")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or means.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("the fused MoBA decode kernel needs unit stride along head_dim")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads do not share {Hkv} KV heads evenly")
    if length is not None and (length.numel() != 1 or length.dtype not in (torch.int32, torch.int64)
                               or length.device != key.device):
        raise ValueError(f"length must be one int32/int64 element on {key.device}, got {tuple(length.shape)} "
                         f"{length.dtype} on {length.device}")
    G = Hq // Hkv
    g_gate = triton.next_power_of_2(G)
    g_p = max(16, g_gate)                            # tl.dot takes at least 16 rows
    block_d = max(16, triton.next_power_of_2(D))
    n_extra = max(topk - 1, 0)
    candidates = (K - 1) // block_size               # the most complete blocks any row's query can have
    union = min(G * n_extra, candidates) + 1         # the most distinct blocks a group attends, own block included
    chunk = max(16, min(CHUNK, triton.next_power_of_2(block_size)))   # tl.dot takes at least 16 columns
    chunks = triton.cdiv(block_size, chunk)
    n_splits = union * chunks
    nb = triton.next_power_of_2(max(candidates, 1))
    gating = bool(n_extra and candidates)
    n_part = B * Hkv * n_splits * g_p
    # One fp32 workspace: the splits' partial states (max, sum, output) and then the gate's scores.
    work = torch.empty(n_part * (2 + block_d) + (B * Hkv * g_gate * nb if gating else 0),
                       dtype=torch.float32, device=query.device)
    q = query[:, :, 0]
    from_ptr = length is not None
    len_arg = length if from_ptr else pad_slots      # an unread pointer when the length is K
    if gating:
        gate_chunk = max(1, GATE_ELEMENTS // (g_gate * block_d))
        _moba_decode_gate_kernel[(B * Hkv, triton.cdiv(candidates, gate_chunk))](
            q, means, pad_slots, len_arg, work, n_part, K, D, G,
            q.stride(0), q.stride(1), means.stride(0), means.stride(1), means.stride(2),
            BLOCK_SIZE=block_size, NB=nb, GATE_CHUNK=gate_chunk, G_GATE=g_gate, BLOCK_D=block_d, HKV=Hkv,
            LEN_FROM_PTR=from_ptr, num_warps=4)
    _moba_decode_split_kernel[(B * Hkv, n_splits)](
        q, key, value, pad_slots, len_arg, work, n_part, K, D, G, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        BLOCK_SIZE=block_size, N_EXTRA=n_extra if gating else 0, NB=nb, CHUNKS=chunks, CHUNK=chunk,
        BLOCK_N=min(BLOCK_N, chunk), G_GATE=g_gate, G_P=g_p, BLOCK_D=block_d, HKV=Hkv,
        IEEE=query.dtype == torch.float32, LEN_FROM_PTR=from_ptr, num_warps=4)
    out = torch.empty(B, Hq, D, dtype=query.dtype, device=query.device)
    _moba_decode_merge_kernel[(B, Hq)](work, n_part, out, D, G, n_splits, out.stride(0), out.stride(1),
                                       G_P=g_p, BLOCK_D=block_d, MERGE_SPLITS=MERGE_SPLITS, num_warps=4)
    return out[:, None]


__all__ = ["moba_decode_means_step", "moba_decode_step"]
