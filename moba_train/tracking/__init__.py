"""What a run records: `metrics.jsonl` in the run directory (always, rank 0) and wandb (offline by default).

Every rank calls the Tracker's methods (some measurements are summed over ranks); only rank 0 writes.
A resumed run truncates the records after its checkpoint's step and reattaches to the same wandb run.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from pathlib import Path

from . import wandb_run
from .metrics_file import FILE_NAME, MetricsFile
from .routing_stats import RoutingCollector, RoutingStats, has_moba_layers, max_blocks, probing
from .summary import StageSummary
from .throughput import StepTiming, Throughput, reset_peak_memory

log = logging.getLogger(__name__)

__all__ = ["Tracker", "StageSummary", "StepTiming", "RoutingStats"]

# Records a stage-end evaluation writes: dropped when a resumed run repeats an interrupted evaluation.
EVAL_KINDS = ("eval", "passkey", "eval_error", "stage_end")


WANDB_MAX_BINS = 512


def distance_bins(counts: list[int]) -> tuple[list[int], list[int]]:
    """(counts, edges) over distances 1..the farthest chosen, one bin per distance, or per run of
    neighbouring distances when there are more than wandb's 512 bins."""
    last = max((d for d, c in enumerate(counts) if c), default=1)
    width = -(-last // WANDB_MAX_BINS)
    edges = list(range(1, last + 1, width)) + [last + 1]
    return [sum(counts[a:b]) for a, b in zip(edges, edges[1:])], edges


class Tracker:
    def __init__(self, cfg, output_dir: Path, is_main: bool, resume_step: int = 0, run_id: str | None = None,
                 model=None, world: int = 1, pending_eval_stage: int | None = None,
                 part_way_done: tuple[int, int] = (0, 0)):
        """resume_step: the checkpoint's global step (-1: a fresh run, which keeps no records). The records of
        evaluations the resumed run repeats are dropped: the stage-end ones of `pending_eval_stage`, and the part-way
        ones of stage part_way_done[0] from its part_way_done[1]-th on."""
        self.cfg = cfg
        self.is_main = is_main
        self.output_dir = output_dir
        self.metrics = MetricsFile(output_dir / FILE_NAME)
        self.metrics_path = self.metrics.path
        self.losses: list[float] = []
        self.kept: list[dict] = []          # the records of the steps before a resume
        self.run_id = run_id
        self._wandb = None
        self._collector: RoutingCollector | None = None
        self._stage_perf: dict[str, float] = {}
        self.throughput = (Throughput(model, world, cfg.logger.peak_tflops, measure_peak=is_main)
                           if model is not None else None)
        if not is_main:
            return
        def repeated(r: dict) -> bool:
            if r.get("kind") not in EVAL_KINDS:
                return False
            if r.get("part_way") is None:
                return r.get("stage_index") == pending_eval_stage
            return r.get("stage_index") == part_way_done[0] and r["part_way"] >= part_way_done[1]

        kept = self.metrics.truncate_after(resume_step, drop=lambda r: r.get("kind") == "run_end" or repeated(r))
        self.kept = kept
        self.losses = [r["loss"] for r in kept if r.get("kind") == "train" and r.get("loss") is not None]
        if cfg.logger.wandb:
            self._wandb = wandb_run.start(cfg, output_dir, run_id, config=asdict(cfg))
            self.run_id = self._wandb.id if self._wandb is not None else run_id
        if self.throughput is not None and self.throughput.peak is not None:
            log.info("MFU against %.3g TFLOP/s per device (%s)", self.throughput.peak.tflops,
                     self.throughput.peak.source)

    # ---------------------------------------------------------------- records
    def _write(self, record: dict) -> None:
        if self.is_main:
            self.metrics.append(record)

    def _log(self, values: dict, step: int) -> None:
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if v is not None}, step=step)

    def stage_started(self, stage, plan, step: int = 0, backends: dict | None = None) -> None:
        if self.throughput is not None:
            reset_peak_memory(self.throughput.device)
            if stage.index > 0 or step > 0:    # the first stage starts with a fresh measurement
                self.throughput.refresh_peak()
        self._stage_perf = {"flops": 0.0, "seconds": 0.0, "data_seconds": 0.0, "peak_memory_gib": 0.0}
        self._write({"kind": "stage_start", "stage_index": stage.index, "stage": stage.name, "seq_len": stage.seq_len,
                     "mode": stage.mode, "plan": plan.describe(), "backends": backends or {}, "step": step,
                     "resolved": stage.describe()})

    def stage_summary(self, stage, plan: str, backends: dict) -> StageSummary:
        """A summary of `stage` that already counts the steps it ran before a resume (from metrics.jsonl)."""
        summary = StageSummary(stage.name, stage.seq_len, stage.mode, plan=plan, backends=dict(backends))
        for r in self.kept:
            if r.get("kind") == "train" and r.get("stage_index") == stage.index:
                summary.add_train_record(r.get("loss"), r.get("tokens", 0), bool(r.get("skipped")))
        summary.extra["steps_before_resume"] = summary.steps
        summary.extra["tokens_before_resume"] = summary.tokens
        return summary

    # ---------------------------------------------------------------- routing statistics
    def routing_probe(self, model, plan, stage_step: int, global_step: int, seq_len: int):
        """A context for the coming training step: probes MoBA routing on the first step of each stage
        and every `logger.routing_stats_every` steps; otherwise does nothing. Same decision on every rank."""
        every = self.cfg.logger.routing_stats_every
        sampled = every > 0 and (stage_step == 0 or global_step % every == 0)
        if not sampled or not has_moba_layers(plan):
            return contextlib.nullcontext()
        block = plan.config.block_size
        self._collector = RoutingCollector(plan.num_layers, max_blocks(seq_len, block),
                                           self.cfg.logger.routing_stats_queries)
        return probing(model, plan, self._collector)

    def _routing(self, step: int, index: int, stage) -> dict:
        if self._collector is None:
            return {}
        stats, self._collector = self._collector.result(), None
        self._write({"kind": "routing", "step": step, "stage_index": index, "stage": stage.name,
                     **asdict(stats), "mean_distance": stats.mean_distance})
        values = {"routing/mean_block_distance": stats.mean_distance, "routing/mass_captured": stats.mass_captured,
                  wandb_run.section(stage.name, "routing_mass_captured"): stats.mass_captured}
        if self._wandb is not None:
            import wandb

            values["routing/block_distance"] = wandb.Histogram(np_histogram=distance_bins(stats.distance_counts))
        return values

    # ---------------------------------------------------------------- steps
    def log_step(self, step: int, stage, result, lr: float, plan, *, packs: list[dict] | None = None,
                 sp: int = 1, timing: StepTiming | None = None) -> None:
        index = stage.index
        speed = (self.throughput.measure(packs, plan, sp, result.tokens, timing)
                 if self.throughput is not None and packs is not None and timing is not None else {})
        routing = self._routing(step, index, stage)
        if speed and self._stage_perf:
            perf = self._stage_perf
            perf["flops"] += speed["flops"]
            perf["seconds"] += timing.seconds
            perf["data_seconds"] += timing.data_seconds
            perf["peak_memory_gib"] = max(perf["peak_memory_gib"], speed["peak_memory_gib"])
        loss = None if result.skipped else result.loss
        if self.is_main and loss is not None:
            self.losses.append(loss)
        record = {"kind": "train", "step": step, "stage_index": index, "stage": stage.name, "seq_len": stage.seq_len,
                  "loss": loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": result.tokens,
                  "target_tokens": result.target_tokens, "skipped": result.skipped, "plan": plan.describe(), **speed}
        self._write(record)
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                  "train/stage_index": index, "train/stage": stage.name, "train/seq_len": stage.seq_len,
                  wandb_run.section(stage.name, "loss"): loss, **routing}
        values.update({f"perf/{k}": v for k, v in speed.items() if k != "peak_memory_kind"})
        self._log(values, step)

    # ---------------------------------------------------------------- evaluations
    def log_eval(self, step: int, stage, ev, tags: dict | None = None) -> None:
        self._write({"kind": "eval", "step": step, "stage_index": stage.index, "stage": stage.name, **(tags or {}),
                     **asdict(ev)})
        self._log({"eval/loss": ev.mean_loss, "eval/tail_loss": ev.tail_loss,
                   wandb_run.section(stage.name, "val_loss"): ev.mean_loss,
                   wandb_run.section(stage.name, "tail_loss"): ev.tail_loss}, step)

    def log_passkey(self, step: int, stage, result, tags: dict | None = None) -> None:
        self._write({"kind": "passkey", "step": step, "stage_index": stage.index, "stage": stage.name, **(tags or {}),
                     **asdict(result)})
        self._log({f"eval/passkey_{result.haystack}_accuracy": result.accuracy,
                   wandb_run.section(stage.name, f"passkey_{result.haystack}_accuracy"): result.accuracy}, step)

    def log_eval_error(self, step: int, stage, error, tags: dict | None = None) -> None:
        """A stage-end evaluation that failed: console, metrics.jsonl and the wandb run's summary."""
        if self.is_main:
            print(f"stage {stage.name}: evaluation {error.evaluation} FAILED: {error.error}\n  fix: {error.fix}",
                  flush=True)
        self._write({"kind": "eval_error", "step": step, "stage_index": stage.index, "stage": stage.name, **(tags or {}),
                     "evaluation": error.evaluation, "error": error.error, "fix": error.fix})
        if self._wandb is not None:
            self._wandb.summary[wandb_run.section(stage.name, f"eval_error_{error.evaluation}")] = \
                f"{error.error} (fix: {error.fix})"
            self._log({"eval/errors": 1, wandb_run.section(stage.name, "eval_errors"): 1}, step)

    def stage_finished(self, stage, summary, step: int = 0) -> None:
        index = stage.index
        """Record the stage's summary, its speed figures filled in from the steps this process ran."""
        perf = self._stage_perf
        if perf.get("seconds"):
            world = self.throughput.world
            summary.tflops_per_gpu = perf["flops"] / perf["seconds"] / 1e12 / world
            summary.data_wait_share = perf["data_seconds"] / perf["seconds"]
            summary.peak_memory_gib = perf["peak_memory_gib"]
            if self.throughput.peak is not None:
                summary.mfu = summary.tflops_per_gpu / self.throughput.peak.tflops
        self._write({"kind": "stage_end", "stage_index": index, **asdict(summary), "step": step})

    def log_plots(self, paths: dict[str, Path], step: int) -> None:
        if self._wandb is None or not paths:
            return
        import wandb

        self._log({f"plots/{name}": wandb.Image(str(path)) for name, path in paths.items()}, step)

    def finish(self, status: str = "finished", step: int = 0) -> None:
        """status: finished | stopped (a signal; resumable, nothing lost) | failed. Recorded in metrics.jsonl; wandb
        marks a stopped run finished (exit code 0) with status "stopped" in its summary, a failed one failed."""
        self._write({"kind": "run_end", "status": status, "step": step})
        if self._wandb is not None:
            wandb_run.finish(self._wandb, status)
            self._wandb = None
