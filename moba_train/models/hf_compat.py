"""The one place that knows the calling conventions that differ between transformers releases.

The KV cache: transformers 5.24 renamed the attention modules' `past_key_values` argument to `cache` (the old name
is deprecated, to be removed in 5.40), and the model outputs' field with it. Instead of comparing
version numbers, moba-train reads the name off each attention module's own `forward` signature,
once, when a plan is attached; a module that takes none of the known names is refused there, with
the names it does take, so that a future rename fails loudly instead of decoding without a cache.

The head size: `head_dim_of` reads it the way every family's config states it.

Activation checkpointing: 5.20 added `activation_checkpointing_enable` (every_n_layers, CPU offload) and
deprecated `gradient_checkpointing_enable`; `enable_activation_checkpointing` takes whichever exists.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

# Every name transformers has given the KV cache argument, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values")


@dataclass(frozen=True)
class CacheArgument:
    """Where one attention module class receives its KV cache: by `keyword`, or positionally at `position`."""

    keyword: str
    position: int | None      # index into forward's positional args (self excluded), None if keyword-only

    def read(self, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """(passed?, cache) for one call; a deprecated alias passed by the caller counts too."""
        for name in (self.keyword, *CACHE_KEYWORDS):
            if name in kwargs:
                return True, kwargs[name]
        if self.position is not None and len(args) > self.position:
            return True, args[self.position]
        return False, None


_by_class: dict[type, CacheArgument] = {}


def cache_argument(module) -> CacheArgument:
    """How `module`'s class takes its KV cache; ValueError naming its parameters when it takes none we know."""
    cls = type(module)
    if cls not in _by_class:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]     # drop self
        names = [p.name for p in params]
        keyword = next((k for k in CACHE_KEYWORDS if k in names), None)
        if keyword is None:
            raise ValueError(
                f"{cls.__name__}.forward takes {names}, none of the KV cache keywords moba-train knows "
                f"{list(CACHE_KEYWORDS)}: this transformers release renamed the cache argument again. Pin "
                f"transformers to the tested range in pyproject.toml (make install uses the lock), or add the new "
                f"name to CACHE_KEYWORDS in moba_train/models/hf_compat.py")
        param = params[names.index(keyword)]
        positional = param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        _by_class[cls] = CacheArgument(keyword, names.index(keyword) if positional else None)
    return _by_class[cls]


def model_cache_keyword(model) -> str:
    """The keyword under which `model.forward` takes a KV cache (for callers that decode step by step)."""
    names = inspect.signature(type(model).forward).parameters
    for keyword in CACHE_KEYWORDS:
        if keyword in names:
            return keyword
    raise ValueError(f"{type(model).__name__}.forward takes none of the KV cache keywords {list(CACHE_KEYWORDS)}")


def output_cache(output) -> Any:
    """The KV cache a model call returned (`output.cache` on transformers >= 5.24, `past_key_values` before)."""
    fields = getattr(output, "__dataclass_fields__", {})
    for name in CACHE_KEYWORDS:
        if name in fields:
            return getattr(output, name)
    raise ValueError(f"{type(output).__name__} has no KV cache field (fields {list(fields)}, known names "
                     f"{list(CACHE_KEYWORDS)})")


def enable_activation_checkpointing(model, every_n_layers: int = 1, offload: bool = False) -> None:
    """Recompute every `every_n_layers`-th decoder layer in the backward (non-reentrant); `offload` keeps the
    checkpointed inputs in CPU memory (transformers >= 5.20 only, else ValueError naming the fix)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload,
                                              every_n_layers=every_n_layers)
        return
    if offload:
        raise ValueError("model.offload_activations needs transformers' activation_checkpointing_enable "
                         "(transformers >= 5.20); install the tested versions (make install) or set "
                         "model.offload_activations=false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # what every_n_layers does in later releases: only every n-th layer keeps its checkpointing switched on
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and m is not model
              and type(m).__name__.endswith("DecoderLayer")]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every_n_layers == 0


def head_dim_of(config) -> int:
    """A transformers config's attention head size: `head_dim` where the family states it (Gemma, Qwen3: not
    hidden_size / heads), else hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


__all__ = ["CACHE_KEYWORDS", "head_dim_of", "CacheArgument", "cache_argument", "enable_activation_checkpointing",
           "model_cache_keyword", "output_cache"]
