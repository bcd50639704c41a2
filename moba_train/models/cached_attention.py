"""Attention over a KV cache (generation: fewer queries than keys), for full and MoBA layers.

The S queries are the last S cache slots, so causality is bottom-right. Each batch row holds one
sequence, possibly left-padded (`key_valid` False on padding). MoBA layers keep MoBA's rule while
decoding: a query attends its own block causally plus the topk - 1 earlier blocks whose mean key
scores highest, with blocks counted from the row's first real token, exactly as in training.
The mask is dense [B, Hq, S, K], fine for decoding (S small) but not meant for long prefills.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .plan import LayerAttention


def _moba_restrict(allowed: torch.Tensor, query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor,
                   layer: LayerAttention) -> torch.Tensor:
    """Narrow a causal mask [B, 1, S, K] to MoBA's chosen blocks: [B, Hq, S, K]."""
    B, Hq, S, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    bs = layer.block_size
    position = key_valid.long().cumsum(-1) - 1                            # within the row's sequence
    block = torch.where(key_valid, position // bs, -1)                    # [B, K], -1 on padding
    n_blocks = int(block.max()) + 1
    # Mean key of each block (padding goes to a spare slot n_blocks), in fp32 as in training's gate.
    slot = torch.where(key_valid, block, n_blocks)
    sums = torch.zeros(B, Hkv, n_blocks + 1, D, dtype=torch.float32, device=key.device)
    sums.scatter_add_(2, slot[:, None, :, None].expand(B, Hkv, K, D), key.detach().float())
    counts = torch.zeros(B, n_blocks + 1, dtype=torch.float32, device=key.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.float32))
    means = sums[:, :, :n_blocks] / counts[:, None, :n_blocks, None].clamp_min(1)

    group = Hq // Hkv
    q = query.detach().float().reshape(B, Hkv, group, S, D)
    scores = torch.einsum("bhgsd,bhnd->bhgsn", q, means).reshape(B, Hq, S, n_blocks)
    own = block[:, K - S:]                                                # [B, S] block of each query
    earlier = torch.arange(n_blocks, device=key.device)[None, None, :] < own[:, :, None]
    scores = scores.masked_fill(~earlier[:, None], float("-inf"))
    chosen = torch.zeros(B, Hq, S, n_blocks + 1, dtype=torch.bool, device=key.device)
    extra = min(layer.topk - 1, n_blocks)
    if extra > 0:
        vals, idx = scores.topk(extra, dim=-1)
        chosen.scatter_(-1, torch.where(torch.isfinite(vals), idx, n_blocks), True)
    key_chosen = chosen.gather(-1, slot[:, None, None, :].expand(B, Hq, S, K))
    same_block = (block[:, None, :] == own[:, :, None])[:, None]         # [B, 1, S, K]
    return allowed & (same_block | key_chosen)


# How each mode narrows the causal mask.
CACHED_MASKS: dict[str, Callable] = {
    "full": lambda allowed, query, key, key_valid, layer: allowed,
    "moba": _moba_restrict,
}


def attend_cached(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None,
                  layer: LayerAttention, softmax_scale: float | None) -> torch.Tensor:
    """query [B, Hq, S, D], key/value [B, Hkv, K, D] with K >= S; key_valid [B, K] or None. Returns [B, S, Hq, D]."""
    B, _, S, _ = query.shape
    K = key.shape[2]
    if key_valid is None:
        key_valid = torch.ones(B, K, dtype=torch.bool, device=key.device)
    query_slot = torch.arange(K - S, K, device=key.device)
    causal = torch.arange(K, device=key.device)[None, :] <= query_slot[:, None]          # [S, K]
    allowed = causal[None, None] & key_valid[:, None, None, :]
    allowed = CACHED_MASKS[layer.mode](allowed, query, key, key_valid, layer)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=softmax_scale, enable_gqa=True)
    # Padding queries see no key at all; make their (unused) output 0 on every device.
    out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2)
