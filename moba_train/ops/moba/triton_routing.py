"""MoBA's gate in Triton: block means, then a tiled top-k that never stores a score tensor.

One program scores a tile of queries (consecutive tokens of one block, one query head) against the
candidate blocks of their document in chunks, and keeps a running top-(topk-1) per query in
registers. Memory is the inputs, the [NB, Hkv, D] means and the [T, Hq, n_select] result.

Means are summed in fp32 and rounded by the `centroids` convention of routing.py (to the input dtype
for "reference"). Scores are q . mean(K_block) in fp32 like `routing.select_blocks`. When the means are rounded
to the queries' 16-bit dtype (the default convention), one tensor-core product in that dtype can compute them
(`input_dtype_dot`, TileConfig.gate_in_input_dtype; off until measured on a GPU): each product of two bf16 (or
fp16) values is exact in fp32 and the tensor cores sum them in fp32, as for tf32x3, with a third of the
products, each at twice tf32's rate. Otherwise (fp32 inputs, or fp32 centroids) "tf32x3" splits each fp32
operand into three tf32 products on the tensor cores, about as exact as fp32 FMA. Either way the sums run in
another order than the PyTorch gate's, so the two may disagree on near-ties (see routing.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing import round_centroids, rounds_centroids

SCORE_PRECISION = "tf32x3"


@triton.jit
def _block_means_kernel(k_ptr, means_ptr, block_start_ptr, block_len_ptr, stride_kt, stride_kh, D,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    blk = tl.program_id(0)
    head = tl.program_id(1)
    heads = tl.num_programs(1)
    start = tl.load(block_start_ptr + blk).to(tl.int64)
    n = tl.load(block_len_ptr + blk)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, n, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ptrs = k_ptr + (start + offs_t)[:, None] * stride_kt + head * stride_kh + offs_d[None, :]
        x = tl.load(ptrs, mask=(offs_t[:, None] < n) & (offs_d[None, :] < D), other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(means_ptr + (blk * heads + head) * D + offs_d, acc / n.to(tl.float32), mask=offs_d < D)


@triton.jit
def _select_blocks_kernel(q_ptr, means_ptr, sel_ptr, block_start_ptr, block_len_ptr, block_doc_first_ptr,
                          stride_qt, stride_qh, Hq, G, Hkv, D, n_select, chunks_per_block, blk_base, tok_base,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, IN_DTYPE_DOT: tl.constexpr):
    """sel[t - tok_base, hq, :n_select] = ids of the best earlier blocks of t's document, for the tokens of blocks
    blk_base.. (one program per 64 tokens of a block and query head); -1 pads a short list."""
    blk = blk_base + tl.program_id(0) // chunks_per_block
    chunk = tl.program_id(0) % chunks_per_block
    hq = tl.program_id(1)
    hkv = hq // G
    start = tl.load(block_start_ptr + blk)
    n = tl.load(block_len_ptr + blk)
    first = tl.load(block_doc_first_ptr + blk)
    if chunk * BLOCK_M < n:
        offs_m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
        tokens = (start + offs_m).to(tl.int64)
        row_ok = offs_m < n
        slot = tl.arange(0, BLOCK_K)
        slot_real = slot < n_select
        out_ptrs = sel_ptr + ((tokens[:, None] - tok_base) * Hq + hq) * n_select + slot[None, :]
        out_mask = row_ok[:, None] & slot_real[None, :]
        n_cand = blk - first
        if n_cand <= n_select:
            # Every earlier block of the document is selected: no scores needed.
            ids = tl.where(slot[None, :] < n_cand, first + slot[None, :], -1) + tl.zeros([BLOCK_M, BLOCK_K], tl.int32)
            tl.store(out_ptrs, ids, mask=out_mask)
        else:
            offs_d = tl.arange(0, BLOCK_D)
            qt = tl.load(q_ptr + tokens[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
                         mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            if not IN_DTYPE_DOT:
                qt = qt.to(tl.float32)
            # Running best list: real slots start empty (-inf), padding slots are never the worst (+inf).
            best = tl.where(slot_real, float("-inf"), float("inf"))[None, :] + tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
            best_id = tl.full([BLOCK_M, BLOCK_K], -1, tl.int32)
            for j0 in range(first, blk, BLOCK_N):
                cand = j0 + tl.arange(0, BLOCK_N)
                cand_ok = cand < blk
                mt = tl.load(means_ptr + (cand[:, None].to(tl.int64) * Hkv + hkv) * D + offs_d[None, :],
                             mask=cand_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                if IN_DTYPE_DOT:   # the means are values of q's dtype: the cast is exact
                    s = tl.dot(qt, tl.trans(mt.to(qt.dtype)), out_dtype=tl.float32)
                else:
                    s = tl.dot(qt, tl.trans(mt), input_precision=PRECISION)
                s = tl.where(cand_ok[None, :], s, float("-inf"))
                # Move the chunk's best into the list while it beats the list's worst: a row needs at
                # most as many rounds as it has candidates above its current worst.
                above = tl.sum((s > tl.min(best, axis=1)[:, None]).to(tl.int32), axis=1)
                for _ in range(tl.minimum(tl.max(above, axis=0), n_select)):
                    c_max = tl.max(s, axis=1)
                    c_arg = tl.min(tl.where(s == c_max[:, None], cand[None, :], 2147483647), axis=1)
                    worst = tl.min(best, axis=1)
                    w_arg = tl.min(tl.where(best == worst[:, None], slot[None, :], BLOCK_K), axis=1)
                    take = c_max > worst
                    put = take[:, None] & (slot[None, :] == w_arg[:, None])
                    best = tl.where(put, c_max[:, None], best)
                    best_id = tl.where(put, c_arg[:, None], best_id)
                    s = tl.where(take[:, None] & (cand[None, :] == c_arg[:, None]), float("-inf"), s)
            tl.store(out_ptrs, best_id, mask=out_mask)


def block_means(k: torch.Tensor, block_start: torch.Tensor, block_len: torch.Tensor,
                centroids: str = "reference") -> torch.Tensor:
    """[NB, Hkv, D] mean of each block's keys, in fp32, rounded as `centroids` says (routing.round_centroids)."""
    NB, (T, Hkv, D) = block_start.numel(), k.shape
    means = torch.empty(NB, Hkv, D, dtype=torch.float32, device=k.device)
    if NB:
        _block_means_kernel[(NB, Hkv)](k, means, block_start, block_len, k.stride(0), k.stride(1), D,
                                       BLOCK_T=64, BLOCK_D=triton.next_power_of_2(max(D, 16)))
    return round_centroids(means, k.dtype, centroids)


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_start: torch.Tensor, block_len: torch.Tensor,
                  block_doc_first: torch.Tensor, block_size: int, n_select: int,
                  block_m: int = 64, block_n: int = 32, centroids: str = "reference",
                  means: torch.Tensor | None = None, span: tuple[int, int, int, int] | None = None,
                  input_dtype_dot: bool = False) -> torch.Tensor:
    """[T, Hq, n_select] int32 ids of the blocks each query attends besides its own, best first
    until the list is full; -1 only at the tail, when the document has fewer earlier blocks.
    `span` (b0, b1, t0, t1): route only the tokens t0..t1 of blocks b0..b1, into a [t1 - t0, Hq, n_select]
    selection; `means`: the block means (`block_means`) when the caller routes several spans.
    `input_dtype_dot`: score by one product in the inputs' dtype where that is exact (16-bit inputs whose means the
    convention rounds to that dtype: `routing.rounds_centroids`); tf32x3 elsewhere, which scores the same up to
    the order of the fp32 sums."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    b0, b1, t0, t1 = span if span is not None else (0, block_start.numel(), 0, T)
    sel = torch.empty(t1 - t0, Hq, n_select, dtype=torch.int32, device=q.device)
    if n_select == 0 or b1 == b0:
        return sel
    if means is None:
        means = block_means(k, block_start, block_len, centroids)
    block_m = min(block_m, max(16, triton.next_power_of_2(block_size)))
    chunks = -(-block_size // block_m)
    _select_blocks_kernel[((b1 - b0) * chunks, Hq)](
        q, means, sel, block_start, block_len, block_doc_first, q.stride(0), q.stride(1), Hq, Hq // Hkv, Hkv, D,
        n_select, chunks, b0, t0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(max(D, 16)),
        BLOCK_K=triton.next_power_of_2(max(n_select, 2)), PRECISION=SCORE_PRECISION,
        IN_DTYPE_DOT=input_dtype_dot and q.dtype == k.dtype and rounds_centroids(k.dtype, centroids))
    return sel
