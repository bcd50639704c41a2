"""The staged training job: load, then for each stage set RoPE, attention plan and data, and train.

What a stage inherits from the one before (logged at every transition):
  always       weights, global step, RNG streams
  by default   Adam moments (carry_over.optimizer_state: true)
  restarts     the LR schedule (carry_over.lr_schedule: false) and the data position (carry_over.data_position: false)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from moba_train.models import AttentionPlan, attach_plan, export_model, set_rope

from . import checkpoint
from .config import RunConfig, StageConfig, stage_attention, stage_sequence_parallel
from .engine import build_engine, init_distributed, on_gpu, set_lr, set_stage_batch
from .failures import StopRequest, explain_oom, is_oom
from .lm import PackedCausalLM
from .model_setup import load_for_training
from .progress import StageProgress, StageSummary, format_table
from .schedule import lr_at
from .stage_data import StageStream, build_stream, stage_steps
from .step import train_step
from moba_train.eval.position_loss import evaluate_position_loss
from moba_train.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    summaries: list[StageSummary] = field(default_factory=list)
    export_dir: Path | None = None
    checkpoint_dir: Path | None = None
    losses: list[float] = field(default_factory=list)


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def train(cfg: RunConfig) -> RunResult:
    init_distributed(cfg.trainer.dist_timeout_s)
    rank, world = _world()
    output_dir = Path(cfg.paths.output_dir).expanduser()
    ckpt_root = output_dir / "checkpoints"
    torch.manual_seed(cfg.trainer.seed)

    # Everything that can be checked without weights is checked before they load.
    resume_from = _resume_source(cfg, ckpt_root)
    state = checkpoint.read_state(resume_from) if resume_from else checkpoint.TrainState()
    if state.stage_index >= len(cfg.stages):
        log.info("checkpoint %s is past the last stage: nothing left to train", resume_from)

    loaded = load_for_training(cfg)
    lm, tokenizer = loaded.model, loaded.tokenizer
    num_layers = lm.config.num_hidden_layers
    plans = [AttentionPlan.from_config(stage_attention(cfg, s), num_layers) for s in cfg.stages]
    sp = stage_sequence_parallel(cfg, cfg.stages[min(state.stage_index, len(cfg.stages) - 1)])
    if sp != 1:
        raise NotImplementedError("sequence_parallel > 1 needs moba_train.distributed (not wired into the trainer yet)")
    dp = world // sp

    first = cfg.stages[min(state.stage_index, len(cfg.stages) - 1)]
    attach_plan(lm, plans[min(state.stage_index, len(cfg.stages) - 1)])
    universal = bool(resume_from) and state.world.get("dp", dp) != dp
    if universal:
        checkpoint.convert_to_universal(resume_from)
    engine = build_engine(PackedCausalLM(lm, cfg.trainer.loss_chunk_tokens), cfg, first, load_universal=universal)
    if resume_from:
        checkpoint.load(engine, resume_from, universal)
        log.info("resumed from %s (stage %d, step %d, global step %d)", resume_from, state.stage_index,
                 state.stage_step, state.global_step)

    tracker = Tracker(cfg, output_dir, rank == 0, resume_step=state.global_step, run_id=state.wandb_run_id)
    state.wandb_run_id = tracker.run_id
    result = RunResult(checkpoint_dir=ckpt_root)
    stop = StopRequest.install()
    try:
        while state.stage_index < len(cfg.stages):
            i = state.stage_index
            summary = _run_stage(cfg, i, engine, lm, tokenizer, plans[i], state, tracker, stop, ckpt_root, dp, rank)
            result.summaries.append(summary)
            if rank == 0:
                print(f"\nstage {summary.name} done\n{format_table([summary])}\n", flush=True)
        if rank == 0 and result.summaries:
            print(f"run {cfg.run_name} finished\n{format_table(result.summaries)}", flush=True)
        if cfg.trainer.export and state.stage_index >= len(cfg.stages):
            result.export_dir = _export(engine, lm, tokenizer, plans[-1], output_dir / "hf_model", rank)
    except Exception as e:
        if is_oom(e):
            raise RuntimeError(explain_oom(cfg, cfg.stages[min(state.stage_index, len(cfg.stages) - 1)])) from e
        raise
    finally:
        stop.uninstall()
        tracker.finish()
    result.losses = tracker.losses
    return result


def _resume_source(cfg: RunConfig, ckpt_root: Path) -> Path | None:
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        return checkpoint.find_resumable(ckpt_root)
    path = Path(mode).expanduser()
    if not (path / checkpoint.STATE_FILE).is_file():
        raise ValueError(f"trainer.resume={mode}: not a complete moba-train checkpoint (no {checkpoint.STATE_FILE}); "
                         f"use resume=auto, resume=never or a directory under <output_dir>/checkpoints/")
    return path


def _transition_message(stage: StageConfig, index: int, plan: AttentionPlan) -> str:
    co = stage.carry_over
    kept = ["weights", "global step", "RNG"] + (["Adam moments"] if co.optimizer_state or index == 0 else [])
    restarted = (["LR schedule (no warmup)"] if co.lr_schedule else ["LR schedule"]) + ([] if co.data_position else ["data position"])
    if index and not co.optimizer_state:
        restarted.append("Adam moments")
    return (f"stage {index} '{stage.name}': {stage.mode}, seq_len {stage.seq_len}, mb {stage.micro_batch_size} x "
            f"accum {stage.grad_accum}, rope {stage.rope.theta or 'unchanged'}"
            f"{' ' + str(stage.rope.scaling) if stage.rope.scaling else ''}, attention {plan.describe()}; "
            f"carried over: {', '.join(kept)}; restarted: {', '.join(restarted) or 'nothing'}")


def _run_stage(cfg, index, engine, lm, tokenizer, plan, state, tracker, stop, ckpt_root, dp, rank) -> StageSummary:
    stage = cfg.stages[index]
    fresh = state.stage_step == 0
    if stage.rope.theta is not None or stage.rope.scaling is not None:
        set_rope(lm, theta=stage.rope.theta, scaling=stage.rope.scaling)
    attach_plan(lm, plan)
    set_stage_batch(engine, stage, dp)
    if fresh and index > 0 and not stage.carry_over.optimizer_state:
        _reset_optimizer_state(engine)
    total = stage_steps(stage, dp)
    if cfg.debug.max_steps_per_stage:
        total = min(total, cfg.debug.max_steps_per_stage)
    stream: StageStream = build_stream(cfg, stage, index, tokenizer, rank=rank // 1, dp_size=dp,
                                       data_state=None if fresh else state.data_state)
    if rank == 0:
        print(_transition_message(stage, index, plan), flush=True)
    tracker.stage_started(index, stage, plan)

    summary = StageSummary(stage.name, stage.seq_len, stage.mode, plan=plan.describe())
    progress = StageProgress(stage.name, total, state.stage_step, enabled=rank == 0)
    started = time.perf_counter()
    # carry_over.lr_schedule: the model is warm already, so the stage skips its warmup
    lr_cfg = dataclasses.replace(stage.lr, warmup=0.0) if stage.carry_over.lr_schedule and index else stage.lr
    while state.stage_step < total:
        changed = plan.set_progress(state.stage_step / total)
        lr = lr_at(state.stage_step, total, lr_cfg)
        set_lr(engine, lr)
        batches = [stream.next_batch() for _ in range(stage.grad_accum)]
        step = train_step(engine, batches, grad_divisor=engine.dp_world_size)
        state.stage_step += 1
        state.global_step += 1
        state.tokens_seen += step.tokens
        state.plan_progress = plan.progress
        state.data_state = stream.state_dict()
        if step.skipped:
            state.bad_steps_total += 1
            summary.skipped_steps += 1
            tracker.bad_steps_in_a_row += 1
            if tracker.bad_steps_in_a_row >= cfg.trainer.max_bad_steps:
                raise RuntimeError(f"{tracker.bad_steps_in_a_row} steps in a row had a NaN/inf loss (stage {stage.name}, "
                                   f"global step {state.global_step}); lower the learning rate (stages[{index}].lr.peak), "
                                   f"check the data, or raise trainer.max_bad_steps")
        else:
            tracker.bad_steps_in_a_row = 0
            summary.first_loss = step.loss if summary.first_loss is None else summary.first_loss
            summary.last_loss = step.loss
        summary.steps += 1
        summary.tokens += step.tokens
        tracker.log_step(state.global_step, index, stage, step, lr, plan)
        progress.update(step.tokens, step.loss, lr, plan.describe() if changed else None)

        stage_done = state.stage_step >= total
        periodic = cfg.trainer.checkpoint_every and state.global_step % cfg.trainer.checkpoint_every == 0
        stop_now = stop.requested()
        if periodic and not stage_done or stop_now:
            state.world = {"dp": dp, "sp": 1}
            checkpoint.save(engine, ckpt_root, state, cfg.trainer.keep_checkpoints)
        if stop_now:
            progress.close()
            raise SystemExit(f"stopped by signal after global step {state.global_step}; checkpoint written to "
                             f"{ckpt_root}; run again to resume")
        if cfg.debug.crash_after_step is not None and state.global_step >= cfg.debug.crash_after_step:
            os._exit(17)   # tests: die like a killed process, without cleanup
    progress.close()
    summary.seconds = time.perf_counter() - started

    if stage.eval and cfg.trainer.eval_batches > 0:
        ev = evaluate_position_loss(engine.module, stream.validation_batches(cfg.trainer.eval_batches), stage.seq_len)
        summary.val_loss, summary.tail_loss = ev.mean_loss, ev.tail_loss
        tracker.log_eval(state.global_step, index, stage, ev)

    # The stage-end checkpoint points at the start of the next stage.
    state.stage_index += 1
    state.stage_step = 0
    state.data_state = {}
    state.world = {"dp": dp, "sp": 1}
    checkpoint.save(engine, ckpt_root, state, cfg.trainer.keep_checkpoints)
    tracker.stage_finished(index, summary)
    return summary


def _reset_optimizer_state(engine) -> None:
    """Forget Adam moments (carry_over.optimizer_state: false): the base optimizer restarts lazily."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    base.state.clear()


def _export(engine, lm, tokenizer, plan, target: Path, rank: int) -> Path:
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()   # gathers the partitions (all ranks)
        if rank == 0:
            prefix = "lm."
            lm_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            export_model(lm, tokenizer, target, plan, state_dict=lm_state)
    elif rank == 0:
        export_model(lm, tokenizer, target, plan)
    if dist.is_initialized():
        dist.barrier()
    return target
