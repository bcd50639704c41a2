"""One layer's decoding step with the cache's length and block means on the device: CUDA-graph capturable.

`MobaKVCache` keeps its length and `BlockMeans` its complete-block counts in Python, so every step launches
kernels sized by the cache so far, and a CUDA graph captured at one length is wrong at the next. At batch 1
the host's part of such a step (three Triton launches and the Python around them, about 0.15 ms on an H100)
costs more than the kernels themselves (about 0.025 ms at 128K: docs/benchmarks.md, Decoding). Here every
quantity that changes from step to step lives on the device:

- the keys and values sit in buffers of a fixed capacity; the new token is written at the slot `length`
  holds (`index_copy_`), then `length` grows by one, both on the device;
- the block means (MoBA layers) sit in a buffer of capacity // block_size blocks, beside a running fp32 sum of
  each row's open block; each step adds the new key to the sum and, in the rows where it completes a block,
  writes the block's mean (`decode_triton.moba_decode_means_step`: one launch, a masked store, no host
  branch). Keys are added one after another in fp32 as the operator's `block_means` adds them, so the gate
  sees the means the operator's sees for the same sequence;
- the fused kernel (`ops.moba.decode_triton.moba_decode_step` with `length`) reads the length from the
  device and sizes its launches by the capacity; a layer that decodes densely masks the slots past the length.

So one captured step replays as the cache grows:

    layer = DeviceDecodeLayer.from_prefill(prefill_keys, prefill_values, capacity, block_size=512, topk=3)
    out = layer.step(q, k_new, v_new)              # eager, once: compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer.step(q, k_new, v_new)          # q, k_new, v_new: static input buffers
    for token in ...: (fill q, k_new, v_new); graph.replay()   # out holds each step's attention

`models.graph_decode` does this for whole model steps. Replaying past the capacity indexes out of the buffers
(a device-side assertion): the caller counts its replays, at most capacity - prefill length of them. Rows may be
left-padded (`key_valid` of the prefill); every appended token is real.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.moba.routing import rounds_centroids
from .block_means import BlockMeans, left_padding
from .kv_cache import MobaKVLayer
from .plan import LayerAttention


def _check_room(capacity: int, filled: int) -> None:
    if capacity <= filled:
        raise ValueError(f"a device decoding cache needs room to append: capacity {capacity} <= the prefill's "
                         f"{filled} slots; allocate capacity >= prompt length + new tokens")


class DeviceDecodeLayer:
    """One layer's KV buffers [B, Hkv, capacity, D], filled length ([1] int64) and, for a MoBA layer that decodes
    sparsely (`block_size` given), its block means [B, Hkv, capacity // block_size, D] in fp32; all on the
    buffers' device. `append` then `attend` (or `step`, both) launch the same work at every length."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int, block_size: int | None = None,
                 topk: int = 0, centroids: str = "reference", key_valid: torch.Tensor | None = None):
        """keys/values [B, Hkv, capacity, D]: buffers whose first `filled` slots hold the prefill (key_valid
        [B, filled], False on left padding, or None); they are used in place. `block_size` None: dense."""
        B, Hkv, capacity, D = keys.shape
        _check_room(capacity, filled)
        self.keys, self.values = keys, values
        # Slots past the length: zeros, not whatever the allocation held. Dense attention reads them under a
        # mask, and masked probabilities of 0 times a NaN there would still give NaN.
        keys[:, :, filled:].zero_()
        values[:, :, filled:].zero_()
        self.block_size, self.topk, self.centroids = block_size, topk, centroids
        self.pad_slots = torch.tensor(left_padding(key_valid, B, filled), dtype=torch.int64, device=keys.device)
        if block_size is not None:     # the prefill's complete blocks, as eager decoding has them
            prefill = BlockMeans(block_size, centroids)
            prefill.update(keys[:, :, :filled], key_valid)
            self.means = torch.zeros(B, Hkv, capacity // block_size, D, dtype=torch.float32, device=keys.device)
            done = prefill.max_complete
            self.means[:, :, :done] = prefill.means[:, :, :done]
            self.running_sum = self._open_block_sums(keys, prefill.pad, filled, block_size)
            self.rounded = rounds_centroids(keys.dtype, centroids)
        self.length = torch.tensor([filled], dtype=torch.int64, device=keys.device)
        self._slots = torch.arange(capacity, device=keys.device)

    @classmethod
    def from_prefill(cls, keys: torch.Tensor, values: torch.Tensor, capacity: int, block_size: int | None = None,
                     topk: int = 0, centroids: str = "reference",
                     key_valid: torch.Tensor | None = None) -> "DeviceDecodeLayer":
        """Buffers of `capacity` slots holding a copy of keys/values [B, Hkv, L, D]."""
        B, Hkv, L, D = keys.shape
        _check_room(capacity, L)
        key_buf = keys.new_empty(B, Hkv, capacity, D)
        value_buf = values.new_empty(B, Hkv, capacity, values.shape[-1])
        key_buf[:, :, :L] = keys
        value_buf[:, :, :L] = values
        return cls(key_buf, value_buf, L, block_size, topk, centroids, key_valid)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """The new token's key/value [B, Hkv, 1, D] into the slot `length`; then length + 1."""
        self.keys.index_copy_(2, self.length, key)
        self.values.index_copy_(2, self.length, value)
        self.length += 1

    def attend(self, query: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
        """query [B, Hq, 1, D] of the token appended last -> attention output [B, 1, Hq, D]."""
        scale = softmax_scale if softmax_scale is not None else query.shape[-1] ** -0.5
        if self.block_size is None:
            return self._attend_dense(query, scale)
        from ..ops.moba.decode_triton import moba_decode_means_step, moba_decode_step

        moba_decode_means_step(self.keys, self.pad_slots, self.length, self.running_sum, self.means,
                               self.block_size, self.rounded)
        return moba_decode_step(query, self.keys, self.values, self.means, self.pad_slots, self.block_size,
                                self.topk, scale, self.length)

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             softmax_scale: float | None = None) -> torch.Tensor:
        self.append(key, value)
        return self.attend(query, softmax_scale)

    def _attend_dense(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Dense attention over the whole buffer, masked to each row's real slots below the length (SDPA reads
        every slot of the capacity: a dense layer's step costs what it would at a full cache)."""
        real = (self._slots[None, :] >= self.pad_slots[:, None]) & (self._slots[None, :] < self.length)   # [B, cap]
        out = F.scaled_dot_product_attention(query, self.keys, self.values, attn_mask=real[:, None, None], scale=scale,
                                             enable_gqa=True)
        return out.transpose(1, 2)

    @staticmethod
    def _open_block_sums(keys: torch.Tensor, pad: list[int], filled: int, block_size: int) -> torch.Tensor:
        """[B, Hkv, D] fp32 sum of each row's keys in its open (incomplete) block, added token after token as
        the operator's `block_means` adds them (`index_add_`), so that the block's mean comes out the same."""
        B, Hkv, _, D = keys.shape
        sums = torch.zeros(B, Hkv, D, dtype=torch.float32, device=keys.device)
        for b in range(B):
            first = pad[b] + max(filled - pad[b], 0) // block_size * block_size
            tokens = keys[b, :, first:filled].transpose(0, 1).float()                      # [n, Hkv, D]
            sums[b:b + 1].index_add_(0, tokens.new_zeros(tokens.shape[0], dtype=torch.long), tokens)
        return sums


class DeviceKVLayer(MobaKVLayer):
    """A `MobaKVLayer` after its prefill, taken over by a `DeviceDecodeLayer` (same buffers, no copy): `update`
    appends at the device's length and hands attention the whole buffers, and moba-train's attention runs
    `decoding.attend` (`decode_cache.device_decoding`). The host's `length` stays the prefill's: transformers'
    mask bookkeeping reads it once, when a step is captured, and moba-train's attention takes no mask from it."""

    is_croppable = False

    def __init__(self, prefilled: MobaKVLayer, decoding: DeviceDecodeLayer, plan: LayerAttention):
        super().__init__(prefilled.max_cache_len)
        self._keys, self._values = decoding.keys, decoding.values
        self.length = prefilled.length
        self.device = decoding.keys.device
        self.is_initialized = True
        self._views()
        self.decoding = decoding
        self.plan = plan                   # the layer's attention when the cache was built

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.decoding.append(key_states, value_states)
        return self.decoding.keys, self.decoding.values

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError("a device decoding cache only appends (greedy decoding, fixed batch): crop, "
                                  "reorder, reset and batch changes need MobaKVCache with generate()")

    crop = reset = reorder_cache = batch_select_indices = batch_repeat_interleave = _refuse


__all__ = ["DeviceDecodeLayer", "DeviceKVLayer"]
