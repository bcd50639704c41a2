"""One MoBA layer's sparse decoding step with the cache's length and block means on the device: CUDA-graph capturable.

`MobaKVCache` keeps its length and `BlockMeans` its complete-block counts in Python, so every step launches
kernels sized by the cache so far, and a CUDA graph captured at one length is wrong at the next. At batch 1
the host's part of such a step (three Triton launches and the Python around them, about 0.15 ms on an H100)
costs more than the kernels themselves (about 0.025 ms at 128K: docs/benchmarks.md, Decoding). Here every
quantity that changes from step to step lives on the device:

- the keys and values sit in buffers of a fixed capacity; the new token is written at the slot `length`
  holds (`index_copy_`), then `length` grows by one, both on the device;
- the block means sit in a buffer of capacity // block_size blocks; each step computes the mean of the block
  that ends at the new token and writes it where a row completes a block, leaving the others as they were (a
  masked write, no host branch), with the operator's own `block_means`, so the gate sees what the operator's
  sees for the same sequence;
- the fused kernel (`ops.moba.decode_triton.moba_decode_step` with `length`) reads the length from the
  device and sizes its launches by the capacity.

So one captured `step` replays as the cache grows:

    layer = DeviceDecodeLayer(prefill_keys, prefill_values, capacity, block_size=512, topk=3)
    out = layer.step(q, k_new, v_new)              # eager, once: compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer.step(q, k_new, v_new)          # q, k_new, v_new: static input buffers
    for token in ...: (fill q, k_new, v_new); graph.replay()   # out holds each step's attention

Replaying past the capacity indexes out of the buffers (a device-side assertion): the caller counts its
replays, at most capacity - prefill length of them. Rows may be left-padded (`key_valid` at construction);
every appended token is real.
"""

from __future__ import annotations

import torch

from ..ops.moba import block_means, build_layout
from .block_means import BlockMeans


class DeviceDecodeLayer:
    """One layer's KV buffers [B, Hkv, capacity, D], block means [B, Hkv, capacity // block_size, D] (fp32) and
    filled length ([1] int64), all on the keys' device; `step` appends a token and attends, capturable."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, block_size: int, topk: int,
                 softmax_scale: float | None = None, centroids: str = "reference",
                 key_valid: torch.Tensor | None = None):
        """keys/values [B, Hkv, L, D]: the prefill's cache (key_valid [B, L], False on left padding, or None)."""
        B, Hkv, L, D = keys.shape
        if capacity <= L:
            raise ValueError(f"DeviceDecodeLayer needs room to append: capacity {capacity} <= the prefill's {L} "
                             f"slots; pass capacity >= prompt length + new tokens")
        self.block_size, self.topk, self.centroids = block_size, topk, centroids
        self.softmax_scale = softmax_scale if softmax_scale is not None else D ** -0.5
        self.keys = keys.new_empty(B, Hkv, capacity, D)
        self.values = values.new_empty(B, Hkv, capacity, values.shape[-1])
        self.keys[:, :, :L] = keys
        self.values[:, :, :L] = values
        prefill = BlockMeans(block_size, centroids)           # the prefill's complete blocks, as eager decoding has
        prefill.update(keys, key_valid)
        self.means = torch.zeros(B, Hkv, capacity // block_size, D, dtype=torch.float32, device=keys.device)
        done = prefill.max_complete
        self.means[:, :, :done] = prefill.means[:, :, :done]
        self.pad_slots = prefill.pad_slots
        self.length = torch.tensor([L], dtype=torch.int64, device=keys.device)
        # Fixed index tensors of the per-step block mean: built here, as a captured step cannot copy from the host.
        self._rows = torch.arange(B, device=keys.device)
        self._block_offsets = torch.arange(-block_size, 0, device=keys.device)
        self._row_blocks = build_layout([row * block_size for row in range(B + 1)], block_size, keys.device)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [B, Hq, 1, D], the new token's key/value [B, Hkv, 1, D] -> attention output [B, 1, Hq, D]."""
        from ..ops.moba.decode_triton import moba_decode_step

        self.keys.index_copy_(2, self.length, key)
        self.values.index_copy_(2, self.length, value)
        self.length += 1
        self._add_completed_block()
        return moba_decode_step(query, self.keys, self.values, self.means, self.pad_slots, self.block_size,
                                self.topk, self.softmax_scale, self.length)

    def _add_completed_block(self) -> None:
        """Where the new token completes a row's block, write that block's mean (rows are left-padded by
        different amounts, so at most some rows complete one); elsewhere write back what was there."""
        B, Hkv, _, D = self.keys.shape
        bs = self.block_size
        # The last bs slots, read for every row (clamped before the first block completes: then unused).
        slots = (self.length + self._block_offsets).clamp_min(0)
        tokens = self.keys.index_select(2, slots).transpose(1, 2).reshape(B * bs, Hkv, D)
        fresh = block_means(tokens, self._row_blocks, self.centroids)                        # [B, Hkv, D]
        filled = self.length - self.pad_slots                                               # [B] real tokens
        completes = (filled >= bs) & (filled % bs == 0)
        block = (filled // bs - 1).clamp(0, self.means.shape[2] - 1)
        kept = self.means[self._rows, :, block]                                             # [B, Hkv, D]
        self.means[self._rows, :, block] = torch.where(completes[:, None, None], fresh, kept)


__all__ = ["DeviceDecodeLayer"]
