"""The one object moba-train keeps on each attention module it runs (`module.moba_train`).

Three parts of moba-train need per-module state next to transformers' own attention module: the
attention plan the layer asks for its mode (set by attach_plan, swapped by the routing probe), the
block means of its KV caches (decoding), and the sequence-parallel wrapper (distributed). They share
this one context instead of each setting an attribute of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .decode_cache import KVCacheStates

CONTEXT_ATTRIBUTE = "moba_train"


@dataclass
class AttentionContext:
    plan: Any                                   # an AttentionPlan, or anything with its `at(layer_idx)`
    kv_caches: "KVCacheStates"                  # block means per KV cache (moba_train.models.decode_cache)
    sequence_parallel: Callable | None = None   # Ulysses around attention (moba_train.distributed.ulysses)


def attention_context(module) -> AttentionContext:
    """The module's context; RuntimeError naming the fix when attach_plan never ran on its model."""
    context = getattr(module, CONTEXT_ATTRIBUTE, None)
    if not isinstance(context, AttentionContext):
        raise RuntimeError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no attention plan: "
                           f"call moba_train.models.attach_plan(model, plan) before running a model with moba-train's "
                           f"attention")
    return context


def has_context(module) -> bool:
    return isinstance(getattr(module, CONTEXT_ATTRIBUTE, None), AttentionContext)


__all__ = ["AttentionContext", "CONTEXT_ATTRIBUTE", "attention_context", "has_context"]
