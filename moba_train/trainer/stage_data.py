"""A stage's data stream, seen from the trainer (moba_train.data does the work)."""

from __future__ import annotations

import math
from pathlib import Path

from moba_train.data import build_stage_data
from moba_train.data.stage import StageData

from .config import RunConfig, StageConfig


def stage_steps(stage: StageConfig, dp: int) -> int:
    """Optimizer steps of a stage: given, or enough global batches to cover its tokens."""
    if stage.steps is not None:
        return stage.steps
    per_step = stage.seq_len * stage.micro_batch_size * stage.grad_accum * dp
    return max(1, math.ceil(stage.tokens / per_step))


def stage_seed(cfg: RunConfig, index: int) -> int:
    """Each stage draws its own document order; a stage that carries the data position over shares the
    order (and seed) of the stage it continues."""
    while index > 0 and cfg.stages[index].carry_over.data_position:
        index -= 1
    return cfg.trainer.seed + 1000 * index


def build_stream(cfg: RunConfig, index: int, tokenizer, dp_rank: int, dp_size: int,
                 resume_state: dict | None = None, previous_stage_state: dict | None = None) -> StageData:
    """The stage's stream, at its start, at `resume_state` (a checkpoint inside this stage), or continuing
    the document order where `previous_stage_state` stopped (carry_over.data_position)."""
    stage = cfg.stages[index]
    data = build_stage_data(cfg.data, stage.data, tokenizer, seq_len=stage.seq_len,
                            micro_batch_size=stage.micro_batch_size, mode=stage.mode, seed=stage_seed(cfg, index),
                            cache_dir=str(Path(cfg.paths.cache_dir).expanduser() / "data"), dp_rank=dp_rank,
                            dp_size=dp_size, where=f"stages[{index}] ({stage.name})")
    if resume_state:
        data.load_state_dict(resume_state)
    elif previous_stage_state:
        data.continue_from(previous_stage_state)
    return data
