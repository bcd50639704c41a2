"""MoBA's gate: score each earlier block of a query's document by q . mean(K_block), keep the best.

Shared by the PyTorch backends so that they select identical blocks: top-k routing is
discontinuous, and two implementations that round the scores differently would disagree on
near-ties and then on everything downstream. The gate carries no gradient (as in the paper).

How precise the block means (the centroids) are is a convention of the operator, `centroids`:
  "reference"  MoonshotAI's (moba_naive and their efficient kernel): each block's mean key is rounded to
               the input dtype (bf16/fp16) before it is scored against the query in fp32. The default, so a
               model trained with MoonshotAI's kernels is routed here as it was there.
  "fp32"       the mean is kept in fp32 (moba-train's behaviour before the choice existed; exports written
               then record no convention and load as "fp32").
Both are summed in fp32; for fp32 (and fp64) inputs the two are the same.
"""

from __future__ import annotations

import bisect

import torch

from .layout import BlockLayout

# Scores are computed for a chunk of queries at a time: at most this many fp32 elements.
ROUTING_CHUNK_ELEMENTS = 1 << 23
CENTROIDS = ("reference", "fp32")


def check_centroids(centroids: str) -> None:
    if centroids not in CENTROIDS:
        raise ValueError(f"centroids must be one of {list(CENTROIDS)} (how block means are rounded before the gate "
                         f"scores them), got {centroids!r}")


def rounds_centroids(dtype: torch.dtype, centroids: str) -> bool:
    """Whether the convention rounds fp32 block means of keys in `dtype` to that dtype ("reference", 16-bit)."""
    return centroids == "reference" and dtype in (torch.float16, torch.bfloat16)


def round_centroids(means: torch.Tensor, dtype: torch.dtype, centroids: str) -> torch.Tensor:
    """fp32 block means as the convention scores them: rounded to the keys' dtype ("reference") or not."""
    return means.to(dtype).float() if rounds_centroids(dtype, centroids) else means


def block_means(k: torch.Tensor, layout: BlockLayout, centroids: str = "reference") -> torch.Tensor:
    """[NB, Hkv, D] mean of each block's real keys (a short last block averages what it has), summed in fp32,
    returned in fp32 and rounded as `centroids` says."""
    nb = layout.num_blocks
    sums = torch.zeros(nb, k.shape[1], k.shape[2], dtype=torch.float32, device=k.device)
    sums.index_add_(0, layout.token_block, k.detach().float())
    return round_centroids(sums / layout.block_len.to(torch.float32)[:, None, None], k.dtype, centroids)


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int,
                  centroids: str = "reference") -> torch.Tensor:
    """Global ids of the blocks each query attends besides its own: [T, Hq, topk-1] int64, -1 = none.

    Candidates of a query in block i of a document are the blocks j < i of that document. The best
    topk-1 by score are kept, all of them when fewer exist, in descending score order.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    n_extra = topk - 1
    selected = torch.full((T, Hq, n_extra), -1, dtype=torch.int64, device=q.device)
    if n_extra == 0 or layout.num_blocks == 0:
        return selected
    means = block_means(k, layout, centroids)           # [NB, Hkv, D]
    group = Hq // Hkv
    cu, firsts, bs = layout.cu_seqlens, layout.doc_first_block, layout.block_size

    t0 = 0
    while t0 < T:
        # Candidate window: from the first block of the chunk's first document up to the chunk's last block.
        doc0 = bisect.bisect_right(cu, t0) - 1
        lo = firsts[doc0]

        def own_block(t: int) -> int:
            d = bisect.bisect_right(cu, t) - 1
            return firsts[d] + (t - cu[d]) // bs

        # Largest chunk whose score tensor [chunk, Hq, window] fits the budget (the window grows with it).
        small, big = 1, T - t0
        while small < big:
            mid = (small + big + 1) // 2
            if mid * Hq * max(1, own_block(t0 + mid - 1) - lo) <= ROUTING_CHUNK_ELEMENTS:
                small = mid
            else:
                big = mid - 1
        chunk = small
        t1 = t0 + chunk
        hi = own_block(t1 - 1)  # the chunk's last own block: candidates lie strictly before it
        if hi > lo:
            qc = q[t0:t1].detach().float().view(chunk, Hkv, group, D)
            scores = torch.einsum("tgrd,ngd->tgrn", qc, means[lo:hi]).reshape(chunk, Hq, hi - lo)
            cand = torch.arange(lo, hi, device=q.device)
            valid = (cand[None, :] >= layout.token_doc_first_block[t0:t1, None]) & (
                cand[None, :] < layout.token_block[t0:t1, None])
            scores.masked_fill_(~valid[:, None, :], float("-inf"))
            kk = min(n_extra, hi - lo)
            vals, idx = scores.topk(kk, dim=-1, largest=True, sorted=True)
            ids = torch.where(torch.isfinite(vals), idx + lo, torch.full_like(idx, -1))
            selected[t0:t1, :, :kk] = ids
        t0 = t1
    return selected
