"""A stage's data stream, built from the resolved stage (moba_train.data does the work)."""

from __future__ import annotations

from pathlib import Path

from moba_train.config import RunConfig, Stage
from moba_train.data import build_stage_data
from moba_train.data.stage import StageData


def build_stream(cfg: RunConfig, stage: Stage, tokenizer, dp_rank: int, dp_size: int,
                 resume_state: dict | None = None, previous_stage_state: dict | None = None) -> StageData:
    """The stage's stream, at its start, at `resume_state` (a checkpoint inside this stage), or continuing
    the document order where `previous_stage_state` stopped (carry_over.data_position)."""
    data = build_stage_data(cfg.data, stage.data, tokenizer, seq_len=stage.seq_len,
                            micro_batch_size=stage.micro_batch_size, mode=stage.mode, seed=stage.data_seed,
                            cache_dir=str(Path(cfg.paths.cache_dir).expanduser() / "data"), dp_rank=dp_rank,
                            dp_size=dp_size, where=stage.where)
    if resume_state:
        data.load_state_dict(resume_state)
    elif previous_stage_state:
        data.continue_from(previous_stage_state)
    return data
