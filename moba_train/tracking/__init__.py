"""What a run records: `metrics.jsonl` in the run directory (always, rank 0) and wandb (offline by default).

A resumed run truncates the records after its checkpoint's step, so the files describe exactly the
steps the model really took, and reattaches to the same wandb run id.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg, output_dir: Path, is_main: bool, resume_step: int = 0, run_id: str | None = None):
        self.is_main = is_main
        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.losses: list[float] = []
        self.run_id = run_id
        self._wandb = None
        self._last_time = time.perf_counter()
        if not is_main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        if cfg.logger.wandb:
            self._wandb = _start_wandb(cfg, output_dir, run_id)
            self.run_id = self._wandb.id if self._wandb is not None else run_id

    def _truncate(self, step: int) -> None:
        """Keep only records up to `step` (a fresh run keeps none)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue                              # a line torn by a kill mid-write
            if rec.get("step", 0) <= step:
                kept.append(line)
                if rec.get("kind") == "train" and rec.get("loss") is not None:
                    self.losses.append(rec["loss"])
        self.metrics_path.write_text("".join(l + "\n" for l in kept))

    def _write(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def stage_started(self, index: int, stage, plan) -> None:
        self._last_time = time.perf_counter()
        self._write({"kind": "stage_start", "stage_index": index, "stage": stage.name, "seq_len": stage.seq_len,
                     "mode": stage.mode, "plan": plan.describe(), "step": -1})

    def log_step(self, step: int, index: int, stage, result, lr: float, plan) -> None:
        now = time.perf_counter()
        seconds, self._last_time = now - self._last_time, now
        loss = None if result.skipped else result.loss
        if loss is not None:
            self.losses.append(loss)
        record = {"kind": "train", "step": step, "stage_index": index, "stage": stage.name, "seq_len": stage.seq_len,
                  "loss": loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": result.tokens,
                  "target_tokens": result.target_tokens, "tokens_per_s": result.tokens / max(seconds, 1e-9),
                  "step_seconds": seconds, "skipped": result.skipped, "plan": plan.describe()}
        self._write(record)
        if self._wandb is not None:
            self._wandb.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                             "train/tokens_per_s": record["tokens_per_s"], "train/stage_index": index,
                             f"stage/{stage.name}/loss": loss}, step=step)

    def log_eval(self, step: int, index: int, stage, ev) -> None:
        self._write({"kind": "eval", "step": step, "stage_index": index, "stage": stage.name, **asdict(ev)})
        if self._wandb is not None:
            self._wandb.log({"eval/loss": ev.mean_loss, "eval/tail_loss": ev.tail_loss,
                             f"stage/{stage.name}/val_loss": ev.mean_loss,
                             f"stage/{stage.name}/tail_loss": ev.tail_loss}, step=step)

    def stage_finished(self, index: int, summary) -> None:
        self._write({"kind": "stage_end", "stage_index": index, "step": -1, **asdict(summary)})

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(cfg, output_dir: Path, run_id: str | None):
    mode = cfg.logger.mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(project=cfg.logger.project, group=cfg.logger.group, name=cfg.logger.name or cfg.run_name,
                     dir=str(output_dir), mode=mode, id=run_id, resume="allow" if run_id else None,
                     config=asdict(cfg))
    return run
