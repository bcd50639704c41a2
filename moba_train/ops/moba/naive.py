"""Dense masked MoBA: the test oracle. O(T^2) memory per head; differentiable through autograd.

For each document and query head, build the [L, L] mask "key is causal and in the query's own
block or in one of its selected blocks", then plain softmax attention in fp32.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout, compute_dtype
from .routing import select_blocks


def moba_naive(q, k, v, layout: BlockLayout, *, topk: int, softmax_scale: float,
               centroids: str = "reference") -> torch.Tensor:
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    cdt = compute_dtype(q.dtype)
    selected = select_blocks(q, k, layout, topk, centroids)     # [T, Hq, topk-1] global block ids
    # Upcast once, so gradients from all heads and documents also accumulate in fp32.
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    out = []
    for start, end in zip(layout.cu_seqlens, layout.cu_seqlens[1:]):
        L = end - start
        block = layout.token_block[start:end]           # [L] global block of each token
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        same_block = block[:, None] == block[None, :]
        heads = []
        for h in range(Hq):
            chosen = (block[None, :, None] == selected[start:end, h, None, :]).any(-1)  # [Lq, Lk]
            allowed = causal & (same_block | chosen)
            qh = qf[start:end, h]
            kh = kf[start:end, h // group]
            vh = vf[start:end, h // group]
            scores = (qh @ kh.T) * softmax_scale
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            heads.append(probs @ vh)
        out.append(torch.stack(heads, dim=1))
    return torch.cat(out, dim=0).to(q.dtype)
