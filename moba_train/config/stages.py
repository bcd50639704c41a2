"""A run's stages, resolved once from the composed config into frozen `Stage` objects.

A recipe states only what a stage changes; everything else comes from the run or the stage before:

  attention          merged over the run's `attention:` key by key. The layer schedule (`moba_layers` or
                     `phases`) is one unit: a stage that states either replaces the run's schedule.
  sequence_parallel  the run's `parallel.sequence_parallel` unless the stage gives its own
  rope               theta and scaling each carry on from the stage before (the first stage: the model's own)
  lr                 the stage's own; its warmup is dropped when carry_over.lr_schedule continues the schedule
  data               the stage's mix, parsed and checked against `data.sources`
  data_seed          the stage's own document order, or the order of the stage it continues

Every check of a stage that needs no model lives here and names the fix; checks against the model's
architecture (layers, heads) run in `moba_train.job.preflight` before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moba_train.data.config import DataConfig, StageDataConfig, check_stage_against_sources, parse_stage_data_config
from moba_train.models.plan import SCHEDULE_KEYS, AttentionSpec, attention_spec
from moba_train.schema import ConfigError

from .run import CarryOver, LRConfig, RunSchema, StageConfig

MODES = ("pretrain", "sft")


@dataclass(frozen=True)
class Rope:
    """The RoPE a stage trains with: None keeps the model's own value (the base model's, on a fresh start)."""

    theta: float | None = None
    scaling: dict[str, Any] | None = None

    @property
    def changes_model(self) -> bool:
        return self.theta is not None or self.scaling is not None

    def describe(self) -> str:
        if not self.changes_model:
            return "the model's own"
        parts = [f"theta {self.theta:g}" if self.theta is not None else "theta unchanged"]
        if self.scaling is not None:
            parts.append(", ".join(f"{k}={v}" for k, v in self.scaling.items()))
        return "; ".join(parts)


@dataclass(frozen=True)
class Stage:
    """What one stage trains, fully resolved. Every consumer reads these; none re-reads the recipe."""

    index: int
    name: str
    seq_len: int
    mode: str                       # pretrain | sft
    tokens: int | None              # exactly one of tokens / steps
    steps: int | None
    micro_batch_size: int
    grad_accum: int
    lr: LRConfig                    # effective: warmup 0 when the previous stage's schedule carries on
    rope: Rope                      # effective: inherited from earlier stages
    attention: AttentionSpec        # merged over the run's
    data: StageDataConfig
    sequence_parallel: int
    carry_over: CarryOver
    eval: bool
    eval_at: tuple[float, ...]      # part-way evaluations, fractions of the stage's steps (0: before the first)
    data_seed: int

    @property
    def where(self) -> str:
        return f"stages[{self.index}] ({self.name})"

    def total_steps(self, dp: int) -> int:
        """Optimizer steps of the stage with `dp` data-parallel ranks: given, or enough to cover its tokens."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.tokens / (self.seq_len * self.micro_batch_size * self.grad_accum * dp)))

    def part_way_eval_steps(self, total: int) -> tuple[int, ...]:
        """The stage steps (of `total`) after which the stage is evaluated part-way; its end is not among them."""
        return tuple(sorted({round(f * total) for f in self.eval_at} - {total}))

    def describe(self) -> dict:
        """Plain types, for records (stage_start, wandb config) and the snapshot test."""
        out = dataclasses.asdict(self)
        out["attention"] = self.attention.to_config()
        return out


def merge_attention(run: dict, stage: dict) -> dict:
    """The stage's plan config: its keys over the run's, the layer schedule replaced as a unit."""
    base = dict(run)
    if any(key in stage and stage[key] is not None for key in SCHEDULE_KEYS):
        for key in SCHEDULE_KEYS:
            base.pop(key, None)
    return {**base, **{k: v for k, v in stage.items() if v is not None or k not in SCHEDULE_KEYS}}


def _run_attention(schema: RunSchema) -> dict:
    """The run's `attention:` as a mapping, the unset half of the schedule dropped."""
    raw = dataclasses.asdict(schema.attention)
    return {k: v for k, v in raw.items() if not (k in SCHEDULE_KEYS and v is None)}


def _stage_attention(raw: dict, run: dict, where: str) -> AttentionSpec:
    try:
        return attention_spec(merge_attention(run, raw), f"{where} attention")
    except ValueError as e:
        merged = " (the stage's attention block is merged over the run-level `attention:`)" if raw else ""
        raise ConfigError(f"{e}{merged}") from None


def _check(stage: StageConfig, index: int, previous: StageConfig | None, where: str) -> None:
    if stage.seq_len < 2:
        raise ConfigError(f"{where}: seq_len must be >= 2 (a pack needs a token and its target), got {stage.seq_len}")
    if (stage.tokens is None) == (stage.steps is None):
        raise ConfigError(f"{where}: give exactly one of `tokens` or `steps` (got tokens={stage.tokens}, "
                          f"steps={stage.steps})")
    if (stage.tokens is not None and stage.tokens < 1) or (stage.steps is not None and stage.steps < 1):
        raise ConfigError(f"{where}: tokens/steps must be positive")
    if stage.micro_batch_size < 1 or stage.grad_accum < 1:
        raise ConfigError(f"{where}: micro_batch_size and grad_accum must be >= 1")
    if stage.mode not in MODES:
        raise ConfigError(f"{where}.mode must be one of {list(MODES)}, got {stage.mode!r}")
    if previous is not None and stage.seq_len < previous.seq_len and stage.mode == "pretrain":
        raise ConfigError(f"{where}: seq_len {stage.seq_len} is shorter than the previous stage's {previous.seq_len}; "
                          f"pretraining stages grow the context (order them by seq_len)")
    lr = stage.lr
    if lr.peak <= 0 or not 0 <= lr.min_ratio <= 1 or lr.warmup < 0:
        raise ConfigError(f"{where}: lr needs peak > 0, 0 <= min_ratio <= 1, warmup >= 0")
    if stage.rope.scaling is not None and not isinstance(stage.rope.scaling, dict):
        raise ConfigError(f"{where}: rope.scaling must be a mapping like {{rope_type: yarn, factor: 4.0}} or null, got "
                          f"{stage.rope.scaling!r}")
    if stage.rope.theta is not None and stage.rope.theta <= 0:
        raise ConfigError(f"{where}: rope.theta must be positive, got {stage.rope.theta}")
    if any(not 0.0 <= f < 1.0 for f in stage.eval_at) or len(set(stage.eval_at)) != len(stage.eval_at):
        raise ConfigError(f"{where}: eval_at must be distinct fractions of the stage's steps in [0, 1) (0: before "
                          f"its first step; the end is always evaluated), got {list(stage.eval_at)}")
    if stage.eval_at and not stage.eval:
        raise ConfigError(f"{where}: eval_at asks for part-way evaluations of a stage with eval: false; set eval: "
                          f"true or remove eval_at")
    if index == 0 and stage.carry_over.data_position:
        raise ConfigError(f"{where}: carry_over.data_position continues the previous stage's data, but this is the "
                          f"first stage; remove it")


def _check_attention(spec: AttentionSpec, seq_len: int, sp: int, where: str) -> None:
    if sp < 1 or seq_len % sp:
        raise ConfigError(f"{where}: seq_len {seq_len} must be divisible by sequence_parallel={sp}; "
                          f"pick seq_len a multiple of {sp}")
    if spec.uses_moba() and seq_len % spec.block_size:
        lower = seq_len // spec.block_size * spec.block_size
        raise ConfigError(f"{where}: seq_len {seq_len} must be divisible by the MoBA block_size {spec.block_size}; "
                          f"use a multiple of {spec.block_size} (e.g. {lower or spec.block_size} or "
                          f"{lower + spec.block_size}) or change attention.block_size")


def _data_seed(stages: list[StageConfig], index: int, seed: int) -> int:
    """Each stage draws its own document order; one that carries the data position over continues the
    order (and seed) of the stage it continues."""
    while index > 0 and stages[index].carry_over.data_position:
        index -= 1
    return seed + 1000 * index


def resolve_stages(schema: RunSchema, data: DataConfig) -> tuple[Stage, ...]:
    """Every stage of the run, merged and checked against the parsed `data`; ConfigError naming the stage and fix."""
    names = [s.name for s in schema.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique (checkpoints and logs use them), got {names}")
    run_attention = _run_attention(schema)
    try:
        attention_spec(run_attention, "attention")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    theta, scaling = None, None
    resolved = []
    for i, raw in enumerate(schema.stages):
        where = f"stages[{i}] ({raw.name})"
        _check(raw, i, schema.stages[i - 1] if i else None, where)
        sp = raw.sequence_parallel if raw.sequence_parallel is not None else schema.parallel.sequence_parallel
        attention = _stage_attention(raw.attention, run_attention, where)
        _check_attention(attention, raw.seq_len, sp, where)
        stage_data = parse_stage_data_config(raw.data, f"{where}.data")
        check_stage_against_sources(stage_data, data, raw.seq_len, f"{where}.data")
        theta = raw.rope.theta if raw.rope.theta is not None else theta
        scaling = dict(raw.rope.scaling) if raw.rope.scaling is not None else scaling
        lr = dataclasses.replace(raw.lr, warmup=0.0) if raw.carry_over.lr_schedule and i else raw.lr
        resolved.append(Stage(index=i, name=raw.name, seq_len=raw.seq_len, mode=raw.mode, tokens=raw.tokens,
                              steps=raw.steps, micro_batch_size=raw.micro_batch_size, grad_accum=raw.grad_accum,
                              lr=dataclasses.replace(lr), rope=Rope(theta, scaling), attention=attention,
                              data=stage_data, sequence_parallel=sp, carry_over=dataclasses.replace(raw.carry_over),
                              eval=raw.eval, eval_at=tuple(sorted(raw.eval_at)),
                              data_seed=_data_seed(schema.stages, i, schema.trainer.seed)))
    for stage in resolved[1:]:
        if stage.carry_over.data_position and stage.data != resolved[stage.index - 1].data:
            raise ConfigError(f"{stage.where}: carry_over.data_position continues the previous stage's document "
                              f"stream, so its data block must equal the previous stage's; make them equal or drop "
                              f"carry_over.data_position")
    return tuple(resolved)


def shrink_stages(stages: tuple[Stage, ...], cap: int) -> tuple[Stage, ...]:
    """debug=smoke: every stage at most `cap` tokens long, MoBA blocks and long-document thresholds scaled
    to fit, one process per sequence. The recipe's logic (stages, plans, RoPE, data, SFT) is kept."""
    block = max(1, cap // 4)
    out = []
    for s in stages:
        attention = dataclasses.replace(s.attention, block_size=min(s.attention.block_size, block))
        data = s.data
        if data.long_doc_min_tokens > cap // 2:
            data = dataclasses.replace(data, long_doc_min_tokens=cap // 2)
        out.append(dataclasses.replace(s, seq_len=min(s.seq_len, cap), sequence_parallel=1, micro_batch_size=1,
                                       grad_accum=1, attention=attention, data=data))
    return tuple(out)


__all__ = ["MODES", "Rope", "Stage", "merge_attention", "resolve_stages", "shrink_stages"]
