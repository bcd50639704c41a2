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
`decode_backend` runs sparse decoding steps: "torch" (PyTorch ops), "triton" (the fused kernel,
CUDA GPUs), "auto" (triton on a CUDA device where triton is installed, else torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..ops.full_attn import FULL_ATTN_BACKENDS
from ..ops.moba import BACKENDS as MOBA_BACKENDS
from ..ops.moba import CENTROIDS

log = logging.getLogger(__name__)

# How MoBA layers decode over a KV cache (moba_train.models.cached_attention.CACHED_ATTENTION):
# "moba" keeps MoBA's block rule, so cached decoding equals recomputing the sequence; "full" is dense.
DECODE_MODES = ("moba", "full")
# What runs a sparse decoding step (moba_train.models.cached_attention.DECODE_BACKENDS); auto: torch.
DECODE_BACKENDS = ("auto", "torch", "triton")


@dataclass
class PhaseConfig:
    until: float
    moba_layers: Any


@dataclass
class AttentionPlanConfig:
    """Schema of the plan config, and the one place its defaults live (configs/attention/*.yaml state only
    what differs). Give either `moba_layers` (one phase) or `phases`."""

    block_size: int = 512
    topk: int = 3
    backend: str = "auto"          # MoBA backend (moba_train.ops.moba.BACKENDS)
    full_backend: str = "auto"     # full-attention backend (moba_train.ops.full_attn.FULL_ATTN_BACKENDS)
    decode: str = "moba"           # MoBA layers over a KV cache: moba (sparse) | full (dense, the paper's)
    decode_backend: str = "auto"   # what runs a sparse decoding step: auto (triton on CUDA) | torch | triton
    # how the gate's block means are rounded (moba_train/ops/moba/routing.py): reference (to the input dtype, as
    # MoonshotAI's kernels do) | fp32
    centroids: str = "reference"
    moba_layers: Any = None
    phases: list[PhaseConfig] | None = None


# The keys that together say which layers run MoBA when: a stage that states either replaces both.
SCHEDULE_KEYS = ("moba_layers", "phases")


@dataclass(frozen=True)
class Phase:
    until: float
    moba_layers: Any               # "all" | "none" | {"all_but_last": N} | tuple of layer indices


@dataclass(frozen=True)
class AttentionSpec:
    """A checked plan config in its one normal form (always phases); what AttentionPlan is built from."""

    block_size: int
    topk: int
    backend: str
    full_backend: str
    decode: str
    centroids: str
    phases: tuple[Phase, ...]
    decode_backend: str = "auto"

    def uses_moba(self) -> bool:
        """Whether any phase runs MoBA in some layer (an empty list or "none" everywhere does not)."""
        return any(p.moba_layers not in ("none", ()) for p in self.phases)

    def to_config(self) -> dict:
        """Plain types, in phases form: what checkpoints and exports record."""
        out = dataclasses.asdict(self)
        out["phases"] = [{"until": p.until, "moba_layers": _plain(p.moba_layers)} for p in self.phases]
        return out


@dataclass(frozen=True)
class LayerAttention:
    """What one layer runs: `backend` names the backend of `mode`'s operator; `decode` how a MoBA layer
    attends over a KV cache (full layers always decode densely)."""

    mode: str
    block_size: int
    topk: int
    backend: str
    decode: str = "moba"
    centroids: str = "reference"
    decode_backend: str = "auto"

    def describe(self) -> str:
        if self.mode != "moba":
            return "full"
        dense_decode = ",decode=full" if self.decode == "full" else ""
        fp32 = ",fp32 centroids" if self.centroids == "fp32" else ""
        return f"moba(b{self.block_size},k{self.topk}{dense_decode}{fp32})"


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


def _check_layer_spec(spec: Any, where: str) -> Any:
    """A `moba_layers` spec checked for its form (not yet against a model); lists become tuples."""
    if spec in ("all", "none"):
        return spec
    if isinstance(spec, Mapping):
        if set(spec) != {"all_but_last"} or not _is_int(spec["all_but_last"]) or spec["all_but_last"] < 0:
            raise ValueError(f"{where}: a mapping must be {{'all_but_last': N}} with an int N >= 0, got {spec!r}")
        return {"all_but_last": spec["all_but_last"]}
    if isinstance(spec, (list, tuple)):
        for i in spec:
            if not _is_int(i):
                raise ValueError(f"{where}: layer indices must be ints, got {i!r}")
        return tuple(spec)
    raise ValueError(f"{where}: moba_layers must be 'all', 'none', {{'all_but_last': N}} or a list of layer indices, "
                     f"got {spec!r}")


def _moba_layer_set(spec: Any, num_layers: int, where: str) -> frozenset[int]:
    """Resolve a checked `moba_layers` spec to the set of MoBA layer indices of a model with num_layers."""
    if spec == "all":
        return frozenset(range(num_layers))
    if spec == "none":
        return frozenset()
    if isinstance(spec, Mapping):
        n = spec["all_but_last"]
        if n > num_layers:
            raise ValueError(f"{where}: all_but_last={n} exceeds the model's {num_layers} layers; use at most {num_layers}")
        return frozenset(range(num_layers - n))
    chosen = set()
    for i in spec:
        if not -num_layers <= i < num_layers:
            raise ValueError(f"{where}: layer index {i} is out of range for a model with {num_layers} layers "
                             f"(valid: {-num_layers}..{num_layers - 1})")
        j = i % num_layers
        if j in chosen:
            raise ValueError(f"{where}: layer {j} is listed twice (indices {list(spec)})")
        chosen.add(j)
    return frozenset(chosen)


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


def attention_spec(cfg: Mapping | AttentionSpec, where: str = "attention plan") -> AttentionSpec:
    """Check a plan config (a mapping, as written in YAML) for everything but the model's layer count.

    Keys it does not give take AttentionPlanConfig's defaults. ValueError names `where` and the fix."""
    if isinstance(cfg, AttentionSpec):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: the attention plan config must be a mapping, got {type(cfg).__name__}")
    cfg = _plain(cfg)
    _check_keys(cfg, AttentionPlanConfig, f"{where}")
    full = {**dataclasses.asdict(AttentionPlanConfig()), **cfg}
    for key in ("block_size", "topk"):
        if not _is_int(full[key]) or full[key] < 1:
            raise ValueError(f"{where}: {key} must be an int >= 1, got {full[key]!r}")
    for key, registry in (("backend", MOBA_BACKENDS), ("full_backend", FULL_ATTN_BACKENDS)):
        names = ["auto", *sorted(registry)]
        if full[key] not in names:
            raise ValueError(f"{where}: {key} must be one of {names}, got {full[key]!r}")
    if full["centroids"] not in CENTROIDS:
        raise ValueError(f"{where}: centroids must be one of {list(CENTROIDS)} (reference: block means rounded to the "
                         f"input dtype before the gate scores them, as MoonshotAI's kernels do; fp32: kept in fp32), "
                         f"got {full['centroids']!r}")
    if full["decode"] not in DECODE_MODES:
        raise ValueError(f"{where}: decode must be one of {list(DECODE_MODES)} (how MoBA layers attend "
                         f"while generating over a KV cache), got {full['decode']!r}")
    if full["decode_backend"] not in DECODE_BACKENDS:
        raise ValueError(f"{where}: decode_backend must be one of {list(DECODE_BACKENDS)} (what runs a sparse "
                         f"decoding step), got {full['decode_backend']!r}")
    if (full["moba_layers"] is None) == (full["phases"] is None):
        raise ValueError(f"{where}: give exactly one of `moba_layers` (one setting for the whole stage) or "
                         f"`phases` (a schedule over stage progress), got "
                         f"{'both' if full['phases'] is not None else 'neither'}; a recipe that sets `phases` over the "
                         f"attention group's `moba_layers` should pick the group attention=moba_then_full, or set "
                         f"attention.moba_layers=null")
    raw_phases = [{"until": 1.0, "moba_layers": full["moba_layers"]}] if full["phases"] is None else full["phases"]
    if not isinstance(raw_phases, list) or not raw_phases:
        raise ValueError(f"{where}: phases must be a non-empty list, got {raw_phases!r}")

    phases, previous = [], 0.0
    for n, phase in enumerate(raw_phases):
        at = f"{where} phases[{n}]"
        if not isinstance(phase, Mapping):
            raise ValueError(f"{at} must be a mapping like {{'until': 0.9, 'moba_layers': 'all'}}, got {phase!r}")
        _check_keys(phase, PhaseConfig, at)
        if "until" not in phase or "moba_layers" not in phase:
            raise ValueError(f"{at} needs both 'until' and 'moba_layers', got {phase!r}")
        until = phase["until"]
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not previous < until <= 1.0:
            raise ValueError(f"{at}: until={until!r} must be a number in ({previous}, 1.0]: phases are ordered "
                             f"by increasing `until` (the fraction of the stage's tokens)")
        phases.append(Phase(float(until), _check_layer_spec(phase["moba_layers"], at)))
        previous = float(until)
    if previous != 1.0:
        raise ValueError(f"{where}: the last phase must have until: 1.0 (it has {previous}), so that the plan "
                         f"covers the whole stage")
    return AttentionSpec(full["block_size"], full["topk"], full["backend"], full["full_backend"], full["decode"],
                         full["centroids"], tuple(phases), full["decode_backend"])


def validate_config(cfg: Mapping | AttentionSpec, num_layers: int,
                    where: str = "attention plan") -> tuple[AttentionSpec, list[tuple[float, frozenset[int]]]]:
    """Check a plan config against a model of `num_layers`; return its spec and phases as (until, moba set)."""
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    spec = attention_spec(cfg, where)
    return spec, [(p.until, _moba_layer_set(p.moba_layers, num_layers, f"{where} phases[{n}]"))
                  for n, p in enumerate(spec.phases)]


class AttentionPlan:
    """Per-layer attention mode at the current progress of a stage. Plain object, owned by the trainer."""

    def __init__(self, config: Mapping | AttentionSpec, num_layers: int, progress: float = 0.0):
        self.config, self._phases = validate_config(config, num_layers)
        self.num_layers = num_layers
        self._progress = self._check_progress(progress)
        self._layers = self._resolve(self._progress)

    @classmethod
    def from_config(cls, cfg: Mapping | AttentionSpec, num_layers: int) -> "AttentionPlan":
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
        return tuple(LayerAttention("moba", c.block_size, c.topk, c.backend, c.decode, c.centroids, c.decode_backend)
                     if i in moba else LayerAttention("full", c.block_size, c.topk, c.full_backend, c.decode,
                                                      c.centroids, c.decode_backend)
                     for i in range(self.num_layers))

    def phase_starts(self) -> list[float]:
        """The progress at which each phase begins: [0.0, until of phase 0, ...]."""
        return [0.0, *(phase.until for phase in self.config.phases[:-1])]

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
        return self.config.to_config()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttentionPlan):
            return NotImplemented
        return (self.config, self.num_layers, self._progress) == (other.config, other.num_layers, other._progress)

    def __repr__(self) -> str:
        return f"AttentionPlan(progress={self._progress:.4f}: {self.describe()})"


__all__ = ["AttentionPlan", "AttentionPlanConfig", "AttentionSpec", "DECODE_MODES", "LayerAttention", "Phase", "PhaseConfig",
           "SCHEDULE_KEYS", "attention_spec", "validate_config"]
