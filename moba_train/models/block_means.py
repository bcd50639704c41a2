"""The fp32 mean key of every complete block of a KV cache: sparse MoBA decoding's gate input, kept up to date.

MoBA's gate scores a query against the mean key of each complete earlier block. Recomputing the means over
the whole cache at every decoding step would read the whole cache, as dense attention does; `BlockMeans`
adds a block's mean once, in the step that appends its last token. Its owner (`decode_cache` for
transformers' caches, `kv_cache.MobaKVLayer` for moba-train's own) keeps one per layer and cache.
"""

from __future__ import annotations

import torch

from ..ops.moba import block_means, build_layout
from .mask_facts import once_per_mask

# Block means are computed this many fp32 key elements at a time (a whole prefilled cache at once
# would need an fp32 copy of it).
MEANS_CHUNK_ELEMENTS = 1 << 24


def left_padding(key_valid: torch.Tensor | None, batch: int, slots: int) -> list[int]:
    """Leading padding slots of each row; refuses padding anywhere but on the left."""
    if key_valid is None:
        return [0] * batch
    return list(once_per_mask(key_valid, ("left padding", slots), lambda: _left_padding(key_valid, slots)))


def _left_padding(key_valid: torch.Tensor, slots: int) -> tuple[int, ...]:
    real = key_valid.sum(-1)
    pad = slots - real
    expected = torch.arange(slots, device=key_valid.device)[None, :] >= pad[:, None]
    if not torch.equal(key_valid, expected):
        raise ValueError("sparse MoBA decoding (attention plan decode: moba) needs padding on the left of each row "
                         "only (tokenizer padding_side='left'); pad on the left, or set decode: full")
    return tuple(pad.tolist())


class BlockMeans:
    """fp32 mean key of every complete block of each row of one layer's KV cache.

    Row b may start with pad[b] padding slots; its block j covers the cache slots
    pad[b] + j*block_size .. pad[b] + (j+1)*block_size - 1. `means` is [B, Hkv, capacity, D]; the
    first complete[b] entries of row b are valid. Means are computed by the operator's own
    `block_means`, so decoding selects the blocks that the operator selects for the same sequence.
    """

    def __init__(self, block_size: int, centroids: str = "reference"):
        self.block_size = block_size
        self.centroids = centroids
        self.slots = 0                     # cache slots accounted for
        self.pad: list[int] = []
        self.pad_slots: torch.Tensor | None = None   # [B] int64 on the keys' device
        self.complete: list[int] = []
        self.means: torch.Tensor | None = None
        self.seen_keys = None              # weakref to the cache layer's key tensor after the last update

    @property
    def max_complete(self) -> int:
        return max(self.complete, default=0)

    def update(self, key: torch.Tensor, key_valid: torch.Tensor | None) -> None:
        """Account for the slots appended to the cache since the last call; add the blocks they complete.

        key [B, Hkv, K, D] is the whole cache; key_valid [B, K] (True = real token) or None.
        """
        B, Hkv, K, D = key.shape
        if self.means is None:
            self.pad = left_padding(key_valid, B, K)
            self.pad_slots = torch.tensor(self.pad, dtype=torch.int64, device=key.device)
            self.complete = [0] * B
            self.means = torch.zeros(B, Hkv, 0, D, dtype=torch.float32, device=key.device)
        elif B != len(self.pad) or K < self.slots:
            raise RuntimeError(f"block means cover {self.slots} slots of {len(self.pad)} rows, but the cache has "
                               f"{K} slots of {B} rows: it was changed other than by appending")
        elif key_valid is not None and K > self.slots and not once_per_mask(
                key_valid, ("real from", self.slots), lambda: bool(key_valid[:, self.slots:].all())):
            raise ValueError("sparse MoBA decoding (attention plan decode: moba) needs every appended token to be "
                             "real (padding on the left of the prompt only); set decode: full otherwise")
        bs = self.block_size
        for b in range(B):
            done = max(K - self.pad[b], 0) // bs
            if done > self.complete[b]:
                self._reserve(done)
                self._add_blocks(key, b, self.complete[b], done)
                self.complete[b] = done
        self.slots = K

    def truncate(self, slots: int) -> None:
        """The cache was cropped to its first `slots` slots: forget the blocks that are no longer complete."""
        if slots >= self.slots:
            return
        self.complete = [min(done, max(slots - pad, 0) // self.block_size) for done, pad in zip(self.complete, self.pad)]
        self.slots = slots

    def select(self, rows: torch.Tensor) -> None:
        """The cache's rows became `rows` of the old ones (beam search's reorder, a batch subset or repeat)."""
        if self.means is None:
            return
        index = rows.to(self.means.device)
        self.means = self.means.index_select(0, index)
        picked = index.tolist()
        self.pad = [self.pad[i] for i in picked]
        self.complete = [self.complete[i] for i in picked]
        self.pad_slots = self.pad_slots.index_select(0, index.to(self.pad_slots.device))

    def _reserve(self, blocks: int) -> None:
        capacity = self.means.shape[2]
        if blocks > capacity:   # grow geometrically: amortised O(1) per block
            grown = self.means.new_zeros(*self.means.shape[:2], max(blocks, 2 * capacity, 16), self.means.shape[3])
            grown[:, :, :capacity] = self.means
            self.means = grown

    def _add_blocks(self, key: torch.Tensor, row: int, first: int, last: int) -> None:
        """Means of blocks first..last-1 of `row`, a chunk of blocks at a time."""
        bs, start = self.block_size, self.pad[row]
        Hkv, D = key.shape[1], key.shape[3]
        per_chunk = max(1, MEANS_CHUNK_ELEMENTS // (bs * Hkv * D))
        for lo in range(first, last, per_chunk):
            hi = min(last, lo + per_chunk)
            tokens = key[row, :, start + lo * bs:start + hi * bs].transpose(0, 1)      # [n*bs, Hkv, D]
            layout = build_layout([0, (hi - lo) * bs], bs, key.device)
            self.means[row, :, lo:hi] = block_means(tokens, layout, self.centroids).transpose(0, 1)


__all__ = ["BlockMeans", "MEANS_CHUNK_ELEMENTS", "left_padding"]
