"""The job's wandb run: offline unless the user asks otherwise, one run per job, resumed by id.

Mode, first match wins:
  logger.mode (offline | online | disabled)  ->  $WANDB_MODE  ->  online when the user has logged in
  (WANDB_API_KEY set, or an api.wandb.ai entry in ~/.netrc, which `wandb login` writes)  ->  offline.
Offline runs are written under <output_dir>/wandb/ and uploaded only by `wandb sync` (docs/launch.md).

The run id is stored in the checkpoint (TrainState.wandb_run_id): a restarted job passes it back and
wandb continues the same run (resume="allow"), offline runs included (`wandb sync` merges them by id).
Stages are sections: stage-specific keys are "stage_<name>/...", and every record carries the stage index.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")


def logged_in() -> bool:
    """Whether wandb would find credentials (checked for presence only; nothing is read or sent)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(configured: str | None) -> str:
    mode = configured or os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")
    if mode == "dryrun":          # wandb's old name for offline
        mode = "offline"
    if mode not in MODES:
        raise ValueError(f"wandb mode {mode!r} (from {'logger.mode' if configured else 'WANDB_MODE'}) is not one "
                         f"of {list(MODES)}")
    return mode


def section(stage_name: str, key: str) -> str:
    return f"stage_{stage_name}/{key}"


def start(cfg, output_dir: Path, run_id: str | None, config: dict):
    """A wandb run, or None when disabled."""
    mode = resolve_mode(cfg.logger.mode)
    if mode == "disabled":
        return None
    import wandb

    # The process-wide settings must know the mode too: wandb 0.31 otherwise starts a telemetry
    # exporter from its default (online) settings that contacts the server even for offline runs.
    wandb.setup(settings=wandb.Settings(mode=mode))
    run = wandb.init(project=cfg.logger.project, group=cfg.logger.group, name=cfg.logger.name or cfg.run_name,
                     dir=str(output_dir), mode=mode, id=run_id, resume="allow" if run_id else None,
                     config=config, settings=wandb.Settings(silent=True, console="off"))
    where = "uploaded as it runs" if mode == "online" else f"offline in {Path(run.dir).parent}; upload with `wandb sync`"
    log.info("wandb run %s (%s): %s", run.id, mode, where)
    return run


def finish(run, status: str) -> None:
    """status: finished | stopped (by a signal, resumable: not a failure) | failed."""
    run.summary["status"] = status
    run.finish(exit_code=1 if status == "failed" else 0)
