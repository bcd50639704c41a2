"""AttentionPlan: which layers run MoBA and which full attention, as training progresses within a stage.

The trainer owns one plan per model and moves it along with `set_progress(p)` (p = fraction of the
stage's tokens seen, 0..1); each attention layer asks `plan.at(layer_idx)`. Config (a plain mapping,
as written in a Hydra YAML):

    {"block_size": 512, "topk": 3, "backend": "auto", "decode": "moba", "moba_layers": "all"}
    {"block_size": 512, "topk": 3,
     "phases": [{"until": 0.9, "moba_layers": "all"}, {"until": 1.0, "moba_layers": "none"}]}

`moba_layers` is "all", "none", {"all_but_last": N} or a list of layer indices (negative ones count
from the end). A phase applies while progress < its `until`; the last phase also covers progress 1.0.
`decode` says how MoBA layers attend while decoding over a KV cache: "moba" (sparse, the same rule
as prefill and training) or "full" (dense, the paper's setting). Prefill always follows `mode`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..ops.full_attn import FULL_ATTN_BACKENDS
from ..ops.moba import BACKENDS as MOBA_BACKENDS

log = logging.getLogger(__name__)

# How MoBA layers decode over a KV cache (moba_train.models.cached_attention.CACHED_ATTENTION):
# "moba" keeps MoBA's block rule, so cached decoding equals recomputing the sequence; "full" is dense.
DECODE_MODES = ("moba", "full")


@dataclass
class PhaseConfig:
    until: float
    moba_layers: Any


@dataclass
class AttentionPlanConfig:
    """Schema of the plan config; give either `moba_layers` (one phase) or `phases`."""

    block_size: int = 512
    topk: int = 3
    backend: str = "auto"          # MoBA backend (moba_train.ops.moba.BACKENDS)
    full_backend: str = "auto"     # full-attention backend (moba_train.ops.full_attn.FULL_ATTN_BACKENDS)
    decode: str = "moba"           # MoBA layers over a KV cache: moba (sparse) | full (dense, the paper's)
    moba_layers: Any = None
    phases: list[PhaseConfig] | None = None


@dataclass(frozen=True)
class LayerAttention:
    """What one layer runs: `backend` names the backend of `mode`'s operator; `decode` how a MoBA layer
    attends over a KV cache (full layers always decode densely)."""

    mode: str
    block_size: int
    topk: int
    backend: str
    decode: str = "moba"

    def describe(self) -> str:
        if self.mode != "moba":
            return "full"
        dense_decode = ",decode=full" if self.decode == "full" else ""
        return f"moba(b{self.block_size},k{self.topk}{dense_decode})"


def _plain(obj: Any) -> Any:
    """OmegaConf DictConfig/ListConfig (or any mapping/sequence) -> dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


def _check_keys(cfg: Mapping, schema: type, where: str) -> None:
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key in cfg:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown key {key!r} in {where}{hint} Allowed keys: {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _moba_layer_set(spec: Any, num_layers: int, where: str) -> frozenset[int]:
    """Resolve a `moba_layers` spec to the set of MoBA layer indices."""
    if spec == "all":
        return frozenset(range(num_layers))
    if spec == "none":
        return frozenset()
    if isinstance(spec, Mapping):
        if set(spec) != {"all_but_last"} or not _is_int(spec["all_but_last"]) or spec["all_but_last"] < 0:
            raise ValueError(f"{where}: a mapping must be {{'all_but_last': N}} with an int N >= 0, got {spec!r}")
        n = spec["all_but_last"]
        if n > num_layers:
            raise ValueError(f"{where}: all_but_last={n} exceeds the model's {num_layers} layers; use at most {num_layers}")
        return frozenset(range(num_layers - n))
    if isinstance(spec, list):
        chosen = set()
        for i in spec:
            if not _is_int(i):
                raise ValueError(f"{where}: layer indices must be ints, got {i!r}")
            if not -num_layers <= i < num_layers:
                raise ValueError(f"{where}: layer index {i} is out of range for a model with {num_layers} layers "
                                 f"(valid: {-num_layers}..{num_layers - 1})")
            j = i % num_layers
            if j in chosen:
                raise ValueError(f"{where}: layer {j} is listed twice (indices {spec})")
            chosen.add(j)
        return frozenset(chosen)
    raise ValueError(f"{where}: moba_layers must be 'all', 'none', {{'all_but_last': N}} or a list of layer indices, "
                     f"got {spec!r}")


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


def validate_config(cfg: Mapping, num_layers: int) -> tuple[dict, list[tuple[float, frozenset[int]]]]:
    """Check a plan config; return it normalised (all keys, plain types) and its phases as (until, moba set)."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"the attention plan config must be a mapping, got {type(cfg).__name__}")
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    cfg = _plain(cfg)
    _check_keys(cfg, AttentionPlanConfig, "the attention plan config")
    full = {**dataclasses.asdict(AttentionPlanConfig()), **cfg}
    for key in ("block_size", "topk"):
        if not _is_int(full[key]) or full[key] < 1:
            raise ValueError(f"attention plan: {key} must be an int >= 1, got {full[key]!r}")
    for key, registry in (("backend", MOBA_BACKENDS), ("full_backend", FULL_ATTN_BACKENDS)):
        names = ["auto", *sorted(registry)]
        if full[key] not in names:
            raise ValueError(f"attention plan: {key} must be one of {names}, got {full[key]!r}")
    if full["decode"] not in DECODE_MODES:
        raise ValueError(f"attention plan: decode must be one of {list(DECODE_MODES)} (how MoBA layers attend "
                         f"while generating over a KV cache), got {full['decode']!r}")
    if (full["moba_layers"] is None) == (full["phases"] is None):
        raise ValueError("attention plan: give exactly one of `moba_layers` (one setting for the whole stage) or "
                         "`phases` (a schedule over stage progress)")
    if full["phases"] is None:
        full["phases"] = [{"until": 1.0, "moba_layers": full.pop("moba_layers")}]
    else:
        full.pop("moba_layers")
    if not isinstance(full["phases"], list) or not full["phases"]:
        raise ValueError(f"attention plan: phases must be a non-empty list, got {full['phases']!r}")

    phases, previous = [], 0.0
    for n, phase in enumerate(full["phases"]):
        where = f"attention plan phases[{n}]"
        if not isinstance(phase, Mapping):
            raise ValueError(f"{where} must be a mapping like {{'until': 0.9, 'moba_layers': 'all'}}, got {phase!r}")
        _check_keys(phase, PhaseConfig, where)
        if "until" not in phase or "moba_layers" not in phase:
            raise ValueError(f"{where} needs both 'until' and 'moba_layers', got {phase!r}")
        until = phase["until"]
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not previous < until <= 1.0:
            raise ValueError(f"{where}: until={until!r} must be a number in ({previous}, 1.0]: phases are ordered "
                             f"by increasing `until` (the fraction of the stage's tokens)")
        phases.append((float(until), _moba_layer_set(phase["moba_layers"], num_layers, where)))
        previous = float(until)
    if previous != 1.0:
        raise ValueError(f"attention plan: the last phase must have until: 1.0 (it has {previous}), so that the plan "
                         f"covers the whole stage")
    full["phases"] = [{"until": float(p["until"]), "moba_layers": p["moba_layers"]} for p in full["phases"]]
    return full, phases


class AttentionPlan:
    """Per-layer attention mode at the current progress of a stage. Plain object, owned by the trainer."""

    def __init__(self, config: Mapping, num_layers: int, progress: float = 0.0):
        self.config, self._phases = validate_config(config, num_layers)
        self.num_layers = num_layers
        self._progress = self._check_progress(progress)
        self._layers = self._resolve(self._progress)

    @classmethod
    def from_config(cls, cfg: Mapping, num_layers: int) -> "AttentionPlan":
        return cls(cfg, num_layers)

    @property
    def progress(self) -> float:
        return self._progress

    @staticmethod
    def _check_progress(p: float) -> float:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"plan progress must be a number in [0, 1] (fraction of the stage's tokens), got {p!r}")
        return float(p)

    def _phase(self, p: float) -> frozenset[int]:
        for until, moba in self._phases:
            if p < until:
                return moba
        return self._phases[-1][1]

    def _resolve(self, p: float) -> tuple[LayerAttention, ...]:
        moba = self._phase(p)
        c = self.config
        return tuple(LayerAttention("moba", c["block_size"], c["topk"], c["backend"], c["decode"]) if i in moba
                     else LayerAttention("full", c["block_size"], c["topk"], c["full_backend"], c["decode"])
                     for i in range(self.num_layers))

    def set_progress(self, p: float) -> bool:
        """Move to progress p; log and return True when any layer changes mode."""
        p = self._check_progress(p)
        layers = self._resolve(p)
        changed = layers != self._layers
        self._progress, self._layers = p, layers
        if changed:
            log.info("attention plan at progress %.4f: %s", p, self.describe())
        return changed

    def at(self, layer_idx: int, progress: float | None = None) -> LayerAttention:
        if not _is_int(layer_idx) or not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx {layer_idx!r} out of range for a plan of {self.num_layers} layers")
        if progress is None:
            return self._layers[layer_idx]
        return self._resolve(self._check_progress(progress))[layer_idx]

    def describe(self, progress: float | None = None) -> str:
        """One line, e.g. 'moba(b512,k3) layers 0-28; full 29-31' (at the current progress by default)."""
        layers = self._layers if progress is None else self._resolve(self._check_progress(progress))
        groups: dict[str, list[int]] = {}
        for i, layer in enumerate(layers):
            groups.setdefault(layer.describe(), []).append(i)
        parts = [f"{name} {_ranges(idx)}" for name, idx in groups.items()]
        return "; ".join([parts[0].replace(" ", " layers ", 1), *parts[1:]])

    def to_config(self) -> dict:
        """The normalised config (always in `phases` form): `from_config(plan.to_config(), n)` rebuilds the plan."""
        return copy.deepcopy(self.config)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttentionPlan):
            return NotImplemented
        return (self.config, self.num_layers, self._progress) == (other.config, other.num_layers, other._progress)

    def __repr__(self) -> str:
        return f"AttentionPlan(progress={self._progress:.4f}: {self.describe()})"


__all__ = ["AttentionPlan", "AttentionPlanConfig", "DECODE_MODES", "PhaseConfig", "LayerAttention", "validate_config"]
