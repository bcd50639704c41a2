"""Which KV cache a decoding call uses, and the block means (`BlockMeans`) sparse MoBA decoding keeps for it.

moba-train's own cache (`kv_cache.MobaKVCache`) keeps the block means of each layer beside its keys. For
transformers' `DynamicCache` the state lives on the attention module, keyed weakly by the transformers cache object, so a
generation's state goes away with its cache. Attention functions never see the cache, so a forward
pre-hook (`track_kv_caches`, added by `attach_plan`) records which cache each call uses, read from
the argument that `hf_compat.cache_argument` found in the module's signature. The hook
also drops a state whose cache was changed other than by appending (beam search's reorder, crop,
reset, offload): the cache layer's key tensor is then no longer the one the state last saw, and the
state is rebuilt from the cache, one pass over it, at its next use.
"""

from __future__ import annotations

import logging
import weakref

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from .block_means import BlockMeans
from .context import attention_context
from .device_decode import DeviceDecodeLayer, DeviceKVLayer
from .hf_compat import cache_argument
from .kv_cache import MobaKVLayer
from .plan import LayerAttention

log = logging.getLogger(__name__)

# Caches whose state had to be rebuilt, so that the warning is given once per cache, not per layer and step.
_rebuilt_caches: weakref.WeakSet = weakref.WeakSet()


class KVCacheStates:
    """One attention layer's `BlockMeans` per KV cache object, and the cache of the forward in progress."""

    def __init__(self, module: torch.nn.Module):
        self.by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.current = None                # weakref to the cache of the forward in progress, or None
        self.argument = cache_argument(module)   # raises if the module takes no cache argument we know
        self.last_call_keywords: list[str] = []  # for the error when a decoding call brought no cache


def _cache_layer(cache, layer_idx: int):
    layers = getattr(cache, "layers", None)
    return layers[layer_idx] if layers is not None and layer_idx < len(layers) else None


def _cache_layer_keys(cache, layer_idx: int) -> torch.Tensor | None:
    return getattr(_cache_layer(cache, layer_idx), "keys", None)


def _note_cache(module: torch.nn.Module, args, kwargs) -> None:
    """Forward pre-hook: remember this call's cache; forget its block means if the cache was changed meanwhile."""
    states: KVCacheStates = attention_context(module).kv_caches
    _, cache = states.argument.read(args, kwargs)
    states.last_call_keywords = sorted(kwargs)
    if isinstance(_cache_layer(cache, module.layer_idx), StaticLayer):
        # Its keys are the whole preallocated buffer, not the tokens so far: attention would see empty slots.
        raise ValueError(f"moba-train's attention does not support static KV caches ({type(cache).__name__}); "
                         f"use the default DynamicCache (no cache_implementation in generate())")
    states.current = weakref.ref(cache) if cache is not None else None
    state = states.by_cache.get(cache) if cache is not None else None
    if state is not None:
        seen = state.seen_keys() if state.seen_keys is not None else None
        if seen is None or _cache_layer_keys(cache, module.layer_idx) is not seen:
            del states.by_cache[cache]
            if cache not in _rebuilt_caches:
                _rebuilt_caches.add(cache)
                log.warning("the KV cache was changed other than by appending (beam search, crop, reset, "
                            "offload): MoBA block means are rebuilt from the cache, one pass over it per change")


def track_kv_caches(module: torch.nn.Module) -> KVCacheStates:
    """New block-means state for `module` (an attention module), with the forward pre-hook that feeds it.
    Called once per module, by attach_plan when it creates the module's context."""
    states = KVCacheStates(module)
    module.register_forward_pre_hook(_note_cache, with_kwargs=True)
    return states


def cache_block_means(module: torch.nn.Module, slots_before: int, block_size: int,
                      centroids: str = "reference") -> BlockMeans:
    """The block means of the cache this call decodes with (created empty on first use).

    The cache has already appended this call's keys; the state must account for exactly the
    `slots_before` slots before them, else (a plan change in between, say) it starts over.
    """
    states = attention_context(module).kv_caches
    cache = states.current() if states.current is not None else None
    if cache is None:
        where = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
        raise RuntimeError(f"{where} decodes over a KV cache, but its call passed no {states.argument.keyword!r} "
                           f"(keywords passed: {states.last_call_keywords}): the installed transformers hands the "
                           f"cache to attention modules some other way. Install the tested versions (make install "
                           f"uses the lock) or teach moba_train/models/hf_compat.py the new convention")
    layer = _cache_layer(cache, module.layer_idx)
    if isinstance(layer, MobaKVLayer):
        return layer.means_for(block_size, centroids, slots_before)
    if not isinstance(layer, DynamicLayer):
        raise ValueError(f"sparse MoBA decoding needs moba-train's MobaKVCache or transformers' DynamicCache, got "
                         f"{type(cache).__name__} ({type(layer).__name__} layers); use one of them or set decode: full")
    keys = layer.keys
    state = states.by_cache.get(cache)
    if state is None or (state.block_size, state.centroids) != (block_size, centroids) or state.slots != slots_before:
        state = BlockMeans(block_size, centroids)
        states.by_cache[cache] = state
    state.seen_keys = weakref.ref(keys)
    return state


def device_decoding(module: torch.nn.Module, layer: LayerAttention) -> DeviceDecodeLayer | None:
    """The `DeviceDecodeLayer` of the cache this call decodes with, if it is a device decoding cache
    (`graph_decode.device_kv_cache`), else None. `layer`, the module's attention now, must be the one the
    cache was built for: its block means and kernel settings were fixed then."""
    states = attention_context(module).kv_caches
    cache = states.current() if states.current is not None else None
    cache_layer = _cache_layer(cache, module.layer_idx)
    if not isinstance(cache_layer, DeviceKVLayer):
        return None
    if cache_layer.plan != layer:
        raise ValueError(f"layer {module.layer_idx} attends as {layer.describe()} ({layer}), but its device decoding "
                         f"cache was built for {cache_layer.plan}: build the cache again after changing the plan")
    return cache_layer.decoding


__all__ = ["BlockMeans", "KVCacheStates", "cache_block_means", "device_decoding", "track_kv_caches"]
