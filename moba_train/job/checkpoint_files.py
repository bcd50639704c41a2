"""What a moba-train checkpoint directory holds besides DeepSpeed's files: the run's state.

Read by the trainer (resume) and by evaluation (mode=eval on a training checkpoint); written by
moba_train.trainer.checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where the run stands; everything needed besides the engine to continue exactly."""

    stage_index: int = 0
    stage_step: int = 0                 # optimizer steps done in the current stage
    global_step: int = 0
    tokens_seen: int = 0
    bad_steps_total: int = 0
    data_state: dict = field(default_factory=dict)    # the current stage's sampler (global, rank-independent)
    plan_progress: float = 0.0
    world: dict = field(default_factory=dict)         # {"dp": .., "sp": ..} when saved
    wandb_run_id: str | None = None
    # A stage trained and checkpointed whose stage-end evaluation has not completed: resuming finishes it first.
    eval_pending: int | None = None


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def read_state(ckpt: Path) -> TrainState:
    try:
        return TrainState(**json.loads((ckpt / STATE_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"checkpoint {ckpt} has no readable {STATE_FILE} ({e}); point `trainer.resume` at a "
                         f"complete checkpoint directory or set trainer.resume=never") from None
