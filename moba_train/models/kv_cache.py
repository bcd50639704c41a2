"""A KV cache for generation with moba-train's attention: allocated once, appended in place, block means beside it.

transformers' default `DynamicCache` concatenates every layer's keys and values at every step, copying the
whole cache per token: at 128K tokens that copy, not attention, is most of a decoding step. `MobaKVCache`
allocates each layer's keys and values once for `max_cache_len` slots, writes new tokens into them and hands
attention views of the filled slots (no copy). Each layer also keeps the MoBA block means of its cache
(`BlockMeans`, the gate's input for sparse decoding) and keeps them right when the cache is cropped
(assisted decoding), reordered (beam search) or reset, without a pass over the keys.

    cache = MobaKVCache.for_model(model, max_cache_len=prompt_len + max_new_tokens)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=...)

Attention sees only the filled slots, as with the dynamic cache (transformers' `StaticCache`, which hands
attention its whole buffer, stays refused). Offloading to the CPU is not supported.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .block_means import BlockMeans


class MobaKVLayer(CacheLayerMixin):
    """One layer's keys and values in [B, Hkv, max_cache_len, D] buffers, and its block means."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__()
        if max_cache_len < 1:
            raise ValueError(f"MobaKVCache needs max_cache_len >= 1, got {max_cache_len}")
        self.max_cache_len = max_cache_len
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.block_means: BlockMeans | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self._keys = key_states.new_empty(batch, heads, self.max_cache_len, key_states.shape[-1])
        self._values = value_states.new_empty(batch, heads, self.max_cache_len, value_states.shape[-1])
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_cache_len:
            raise ValueError(f"MobaKVCache holds {self.max_cache_len} tokens per layer and this step would make "
                             f"{end}; create it with max_cache_len >= prompt length + max_new_tokens")
        if key_states.shape[0] != self._keys.shape[0]:
            raise ValueError(f"MobaKVCache was filled for a batch of {self._keys.shape[0]}, this step brings "
                             f"{key_states.shape[0]} rows; use one cache per batch shape")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0          # attention sees the filled slots only

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    # ------------------------------------------------------------- changes other than appending
    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if not self.is_initialized or tokens_to_remove == 0:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self._views()
        if self.block_means is not None:
            self.block_means.truncate(self.length)

    def reset(self) -> None:
        self.length = 0
        self.block_means = None
        if self.is_initialized:
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or reorder, repeat) the rows `indices`; the buffers are replaced when the batch changes size."""
        if not self.is_initialized:
            return
        indices = indices.to(self.device)
        filled_keys = self._keys[:, :, :self.length].index_select(0, indices)
        filled_values = self._values[:, :, :self.length].index_select(0, indices)
        if indices.numel() != self._keys.shape[0]:
            shape = (indices.numel(), *self._keys.shape[1:])
            self._keys, self._values = self._keys.new_empty(shape), self._values.new_empty(
                (indices.numel(), *self._values.shape[1:]))
        self._keys[:, :, :self.length] = filled_keys
        self._values[:, :, :self.length] = filled_values
        self._views()
        if self.block_means is not None:
            self.block_means.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(torch.arange(self._keys.shape[0], device=self.device).repeat_interleave(repeats))

    def offload(self):
        raise NotImplementedError("MobaKVCache keeps every layer on its device; offloading is not supported")

    def prefetch(self):
        raise NotImplementedError("MobaKVCache keeps every layer on its device; offloading is not supported")

    # ------------------------------------------------------------- MoBA
    def means_for(self, block_size: int, centroids: str, slots_before: int) -> BlockMeans:
        """The block means of this cache for a layer decoding with `block_size` and `centroids`, accounting for
        exactly the `slots_before` slots before this call's (else they start over: one pass over the cache)."""
        state = self.block_means
        if state is None or (state.block_size, state.centroids) != (block_size, centroids) \
                or state.slots != slots_before:
            state = self.block_means = BlockMeans(block_size, centroids)
        return state


class MobaKVCache(Cache):
    """The cache to pass to `generate(past_key_values=...)` for models running moba-train's attention."""

    def __init__(self, max_cache_len: int, num_layers: int):
        """`max_cache_len`: tokens per row, prompt and generated; `num_layers`: the model's decoder layers."""
        super().__init__(layers=[MobaKVLayer(max_cache_len) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model, max_cache_len: int) -> "MobaKVCache":
        return cls(max_cache_len, model.config.num_hidden_layers)


__all__ = ["MobaKVCache", "MobaKVLayer"]
