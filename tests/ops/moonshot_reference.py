"""MoonshotAI's MoBA, written here from the paper (arXiv 2502.13189, Sec. 2) and the documented behaviour of
their reference implementation (`moba_attn_varlen_naive`, MoonshotAI/MoBA), independently of moba-train's
operator, for the peer tests (tests/ops/test_moba_moonshot.py).

What their reference does, per document and head (they have no GQA: here KV heads are repeated, in fp32 so
that the gradients of a group's heads add up without bf16 rounding, as a grouped kernel adds them):
  1. cut the keys into blocks of `chunk` tokens, the last one shorter; a block's gate key is the mean of its
     keys *in the input dtype* (torch.mean on bf16 keys gives a bf16 mean: the centroid is rounded);
  2. score every (query, block) pair as q . centroid in fp32;
  3. a query's own block always wins (+inf); blocks that start after it never do (-inf);
  4. keep the top `topk` blocks (the own block among them), then attend causally to the keys of the kept
     blocks with fp32 softmax attention, the result cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch


def moonshot_moba(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], chunk: int,
                  topk: int) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (bf16, differentiable) -> [T, Hq, D] in q's dtype."""
    scale = q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    outs = []
    for start, end in zip(cu_seqlens, cu_seqlens[1:]):
        L = end - start
        qd = q[start:end]
        kd = k[start:end].float().repeat_interleave(group, dim=1)
        vd = v[start:end].float().repeat_interleave(group, dim=1)
        n_blocks = math.ceil(L / chunk)
        with torch.no_grad():
            keys = k[start:end].detach().repeat_interleave(group, dim=1)                                 # input dtype
            centroids = torch.stack([keys[b * chunk:(b + 1) * chunk].mean(dim=0) for b in range(n_blocks)])
            gate = torch.einsum("shd,nhd->hsn", qd.float(), centroids.float())                               # fp32
            token_block = torch.arange(L, device=q.device) // chunk
            blocks = torch.arange(n_blocks, device=q.device)
            gate.masked_fill_(blocks[None, None, :] > token_block[None, :, None], float("-inf"))
            gate.masked_fill_(blocks[None, None, :] == token_block[None, :, None], float("inf"))
            top = gate.topk(min(topk, n_blocks), dim=-1).indices                                             # [H, S, k]
            keep = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, top, True)
            keep &= blocks[None, None, :] <= token_block[None, :, None]
            allowed = keep.gather(-1, token_block[None, None, :].expand(keep.shape[0], L, L))                # [H, S, S]
            allowed &= torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        scores = torch.einsum("xhd,yhd->hxy", qd.float(), kd) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        outs.append(torch.einsum("hxy,yhd->xhd", probs, vd).to(q.dtype))
    return torch.cat(outs)


def moonshot_data(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, device, seed: int = 0):
    """Their test's inputs: randn q/k/v in bf16 and `batch` documents cut at random points (random.sample)."""
    import random

    rng = random.Random(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(seqlen, h, head_dim, generator=g).to(device=device, dtype=torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    cuts = sorted(rng.sample(range(1, seqlen - 1), batch - 1)) if batch > 1 else []
    return q, k, v, [0, *cuts, seqlen]
