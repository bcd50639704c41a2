"""MoBA backend `flex`: torch's FlexAttention with a block mask built from the routing.

The gate is `routing.select_blocks` (shared with naive and lean, so they select identical blocks).
The BlockMask is assembled directly from the selection, never by evaluating the mask over all
(query, key) pairs: per (query head, 128-query tile), the 128-key tiles touched by any row's own
block (up to the diagonal) or selected blocks. Tiles that every row of a query tile sees completely
(inside the rows' own block, strictly before them; or inside a block all of them selected) are
"full" and skip the mask; the rest evaluate `mask_mod` per element. Since the queries of a tile
together select most earlier blocks, this is barely sparse at MoBA's settings: a baseline.
"""

from __future__ import annotations

import functools

import torch

from .layout import BlockLayout
from .routing import select_blocks

TILE = 128  # FlexAttention's default sparse block size, for queries and keys


def missing() -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention: pip install 'torch>=2.5'"
    if not torch.cuda.is_available():
        return "no CUDA device: the flex backend compiles FlexAttention for NVIDIA GPUs"
    return None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _tile_ranges_to_mask(first: torch.Tensor, last: torch.Tensor, on: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """Bool [..., n_tiles]: tile t is set where some range [first[i], last[i]] with on[..., i] covers it.
    first/last: [N] int64 (last < first means empty); on: [..., N] bool."""
    lead = on.shape[:-1]
    diff = torch.zeros(*lead, n_tiles + 1, dtype=torch.int32, device=on.device)
    ok = last >= first
    diff.index_add_(-1, first[ok], on[..., ok].to(torch.int32))
    diff.index_add_(-1, (last + 1)[ok], -on[..., ok].to(torch.int32))
    return diff.cumsum(-1, dtype=torch.int32)[..., :n_tiles] > 0


def build_block_mask(sel: torch.Tensor, layout: BlockLayout):
    """FlexAttention BlockMask of MoBA for selection sel [T, Hq, n_select] (-1 = none)."""
    from torch.nn.attention.flex_attention import BlockMask

    T, Hq, n_select = sel.shape
    device = sel.device
    nq = nk = -(-T // TILE)
    NB = layout.num_blocks
    tokens = torch.arange(T, device=device)
    tile_first = torch.arange(nq, device=device) * TILE
    tile_last = torch.clamp(tile_first + TILE - 1, max=T - 1)
    tile_rows = tile_last - tile_first + 1
    own_first = layout.block_start[layout.token_block[tile_first]]          # own block start of a tile's first row
    one_block = layout.token_block[tile_first] == layout.token_block[tile_last]

    # Own blocks, causal: keys [own_first, tile_last] are touched; tiles inside the rows' single own
    # block and entirely at or before the tile's first row are seen whole by every row.
    diag = torch.eye(nq, dtype=torch.bool, device=device)
    own_any = _tile_ranges_to_mask(own_first // TILE, tile_last // TILE, diag, nk)            # [nq, nk]
    own_full = _tile_ranges_to_mask(-(-own_first // TILE), (tile_first + 1) // TILE - 1, diag & one_block[:, None], nk)

    block_first_tile = layout.block_start // TILE
    block_end = layout.block_start + layout.block_len                                       # exclusive
    any_tiles, full_tiles = [], []
    for h in range(Hq):  # one head at a time keeps the [nq, NB] marks small
        chosen = torch.zeros(nq, NB, dtype=torch.int32, device=device)
        s = sel[:, h]
        ok = s >= 0
        chosen.view(-1).index_add_(0, ((tokens // TILE)[:, None] * NB + s).masked_select(ok),
                                   torch.ones(int(ok.sum()), dtype=torch.int32, device=device))
        touched = _tile_ranges_to_mask(block_first_tile, (block_end - 1) // TILE, chosen > 0, nk)
        by_all = chosen == tile_rows[:, None]
        whole = _tile_ranges_to_mask(-(-layout.block_start // TILE), block_end // TILE - 1, by_all, nk)
        any_tiles.append(touched | own_any)
        full_tiles.append(whole | own_full)
    full = torch.stack(full_tiles)[None]                                                     # [1, Hq, nq, nk]
    partial = torch.stack(any_tiles)[None] & ~full

    def ordered(mark):
        return mark.sum(-1, dtype=torch.int32), torch.argsort(mark.to(torch.int8), dim=-1, descending=True,
                                                              stable=True).to(torch.int32)

    # Pad the per-token lookups to whole tiles: the kernel may evaluate the mask there.
    pad = nq * TILE - T
    token_block = torch.nn.functional.pad(layout.token_block, (0, pad), value=-2)
    sel_p = torch.nn.functional.pad(sel, (0, 0, 0, 0, 0, pad), value=-1)

    def mask_mod(b, h, q_idx, kv_idx):
        kb = token_block[kv_idx]
        hit = kb == token_block[q_idx]
        for slot in range(n_select):
            hit = hit | (sel_p[q_idx, h, slot] == kb)
        return (kv_idx <= q_idx) & hit

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=TILE, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def moba_flex(q, k, v, layout: BlockLayout, *, topk: int, softmax_scale: float, centroids: str = "reference",
              compiled: bool = True) -> torch.Tensor:
    sel = select_blocks(q, k, layout, topk, centroids)
    block_mask = build_block_mask(sel, layout)
    attend = _compiled_flex() if compiled else __import__(
        "torch.nn.attention.flex_attention", fromlist=["flex_attention"]).flex_attention
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    out = attend(qt, kt, vt, block_mask=block_mask, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)
