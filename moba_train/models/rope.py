"""Change RoPE (theta and scaling) of a live model when a stage starts.

transformers computes the rotary frequencies once, when the rotary module is built, so editing
`config.rope_parameters` alone changes nothing. `set_rope` updates the config (which export then
writes out) and refreshes every rotary module in place from a freshly built one, keeping module
identity for wrappers (DeepSpeed, compile) that already hold it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeType:
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


# Keys each scaling type takes besides rope_type and rope_theta (transformers' modeling_rope_utils).
ROPE_TYPES: dict[str, RopeType] = {
    "default": RopeType(()),
    "linear": RopeType(("factor",)),
    "dynamic": RopeType(("factor",)),
    "yarn": RopeType(("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                                   "mscale", "mscale_all_dim", "truncate")),
    "llama3": RopeType(("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
}
# Types whose frequencies depend on the pretraining context length.
NEEDS_ORIGINAL_LENGTH = ("yarn", "llama3")
# Keys that describe the model rather than the scaling, carried over when the scaling changes.
MODEL_KEYS = ("partial_rotary_factor",)


def _scaling_params(scaling: Mapping, current: Mapping, max_position_embeddings: int) -> dict:
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE scaling needs rope_type, one of {sorted(ROPE_TYPES)}; got {rope_type!r}")
    spec = ROPE_TYPES[rope_type]
    if "rope_theta" in scaling:
        raise ValueError("give rope_theta as set_rope(theta=...), not inside scaling")
    missing = [k for k in spec.required if k not in scaling]
    unknown = [k for k in scaling if k not in spec.required + spec.optional]
    if missing or unknown:
        raise ValueError(f"RoPE scaling {rope_type!r} takes {list(spec.required)} (required) and {list(spec.optional)} "
                         f"(optional); missing {missing}, unknown {unknown}")
    factor = scaling.get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1):
        raise ValueError(f"RoPE scaling factor must be a number >= 1, got {factor!r}")
    params = {"rope_type": rope_type, **{k: current[k] for k in MODEL_KEYS if k in current}, **scaling}
    if rope_type in NEEDS_ORIGINAL_LENGTH:
        # The pretraining length: kept from an earlier scaled stage, else the length the model had so far.
        params.setdefault("original_max_position_embeddings",
                          current.get("original_max_position_embeddings", max_position_embeddings))
    return params


def rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)
            and hasattr(m, "original_inv_freq")]


def _refresh(rotary: torch.nn.Module, config) -> None:
    """Give `rotary` the buffers and settings of a module freshly built from `config`."""
    device = rotary.inv_freq.device
    fresh = type(rotary)(config=config)
    for name, buf in fresh.named_buffers(recurse=False):
        rotary.register_buffer(name, buf.to(device), persistent=False)
    for name, value in vars(fresh).items():
        if not name.startswith("_") and name != "training":
            setattr(rotary, name, value)


def set_rope(model: torch.nn.Module, theta: float | None = None, scaling: Mapping | None = None,
             max_position_embeddings: int | None = None) -> dict:
    """Set rope_theta and/or the RoPE scaling of `model` (and its config); return the new rope_parameters.

    scaling: {"rope_type": "default" | "linear" | "dynamic" | "yarn" | "llama3", ...type's keys}, e.g.
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}; None keeps the current one.
    max_position_embeddings: the model's new context length (yarn/llama3/dynamic read it).
    """
    config = model.config
    current = dict(config.rope_parameters or {})
    if "rope_type" not in current or any(isinstance(v, Mapping) for v in current.values()):
        raise ValueError(f"{type(model).__name__} has per-layer-type RoPE parameters {current}; set_rope supports one "
                         f"global RoPE (Llama, Qwen2, Qwen3, Mistral)")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0):
        raise ValueError(f"rope theta must be a positive number, got {theta!r}")
    if max_position_embeddings is not None and (not isinstance(max_position_embeddings, int)
                                                or isinstance(max_position_embeddings, bool)
                                                or max_position_embeddings < 1):
        raise ValueError(f"max_position_embeddings must be an int >= 1, got {max_position_embeddings!r}")
    rotaries = rotary_modules(model)
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (inv_freq buffer); cannot set RoPE")

    old_length = config.max_position_embeddings
    params = dict(current) if scaling is None else _scaling_params(scaling, current, old_length)
    params["rope_theta"] = float(theta) if theta is not None else current["rope_theta"]
    if max_position_embeddings is not None:
        config.max_position_embeddings = max_position_embeddings
    config.rope_parameters = params
    config.validate_rope()
    for rotary in rotaries:
        _refresh(rotary, config)
    log.info("RoPE set: %s, max_position_embeddings=%d", params, config.max_position_embeddings)
    return dict(params)


__all__ = ["set_rope", "rotary_modules", "ROPE_TYPES"]
