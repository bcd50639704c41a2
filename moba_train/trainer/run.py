"""The staged training job: load, then for each stage set RoPE, attention plan, parallelism and data, and train.

What a stage inherits from the one before (logged at every transition):
  always       weights, global step, RNG streams
  by default   Adam moments                      (carry_over.optimizer_state: true)
  restarts     the LR schedule with its warmup   (carry_over.lr_schedule: true skips the warmup)
               the data position                 (carry_over.data_position: true continues the previous
                                                  stage's stream; the data configs must then match)
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

from moba_train.data import DataError, check_stage_data
from moba_train.data.embedded import lee_path
from moba_train.distributed.groups import layout
from moba_train.distributed.ulysses import apply_sequence_parallel, kv_replication, shard_batch
from moba_train.eval.passkey import describe as describe_passkey
from moba_train.eval.position_loss import evaluate_position_loss
from moba_train.eval.stage_end import plots_from_metrics, stage_passkey
from moba_train.models import AttentionPlan, attach_plan, export_model, set_rope
from moba_train.schema import ConfigError
from moba_train.tracking import StepTiming, Tracker

from . import checkpoint
from .config import RunConfig, StageConfig, stage_attention, stage_sequence_parallel
from .engine import build_engine, init_distributed, set_lr, set_stage_batch
from .failures import StopRequest, explain_oom, is_oom
from .lm import PackedCausalLM
from .model_setup import load_for_training
from .progress import StageProgress, StageSummary, format_table
from .schedule import lr_at
from .stage_data import build_stream, stage_steps
from .step import train_step

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    summaries: list[StageSummary] = field(default_factory=list)
    export_dir: Path | None = None
    checkpoint_dir: Path | None = None
    losses: list[float] = field(default_factory=list)


@dataclass
class Job:
    """What every stage of one run works with."""

    cfg: RunConfig
    engine: object
    lm: torch.nn.Module
    tokenizer: object
    plans: list[AttentionPlan]
    state: checkpoint.TrainState
    tracker: Tracker
    stop: StopRequest
    ckpt_root: Path
    rank: int
    world: int


def train(cfg: RunConfig) -> RunResult:
    init_distributed(cfg.trainer.dist_timeout_s)
    rank = dist.get_rank()
    world = dist.get_world_size()
    output_dir = Path(cfg.paths.output_dir).expanduser()
    ckpt_root = output_dir / "checkpoints"
    torch.manual_seed(cfg.trainer.seed)
    for i, stage in enumerate(cfg.stages):
        layout(stage_sequence_parallel(cfg, stage))          # sp divides the number of processes
        check_stage_data(cfg.data, stage.data, seq_len=stage.seq_len, mode=stage.mode,
                         where=f"stages[{i}] ({stage.name})")   # every stage's sources exist, before any weights
    if cfg.eval.passkey.enabled and cfg.eval.passkey.haystack == "lee":
        try:
            lee_path()                                        # passkey haystacks are cut from the Lee articles
        except DataError as e:
            raise ConfigError(f"eval.passkey needs its haystack text: {e}; or set eval.passkey.enabled=false") from None

    resume_from = _resume_source(cfg, ckpt_root)
    state = checkpoint.read_state(resume_from) if resume_from else checkpoint.TrainState()

    loaded = load_for_training(cfg)
    lm = loaded.model
    num_layers = lm.config.num_hidden_layers
    plans = [AttentionPlan.from_config(stage_attention(cfg, s), num_layers) for s in cfg.stages]
    heads = lm.config.num_attention_heads
    kv_heads = getattr(lm.config, "num_key_value_heads", None) or heads
    for i, stage in enumerate(cfg.stages):
        try:
            kv_replication(stage_sequence_parallel(cfg, stage), heads, kv_heads)
        except ValueError as e:
            raise ValueError(f"stages[{i}] ({stage.name}): {e}") from None

    current = min(state.stage_index, len(cfg.stages) - 1)
    attach_plan(lm, plans[current])
    universal = bool(resume_from) and state.world.get("world", world) != world
    if universal:
        checkpoint.convert_to_universal(resume_from)
    engine = build_engine(PackedCausalLM(lm, cfg.trainer.loss_chunk_tokens), cfg, cfg.stages[current],
                          load_universal=universal)
    if resume_from:
        checkpoint.load(engine, resume_from, universal)
        if rank == 0:
            print(f"resumed from {resume_from}: stage {state.stage_index}, stage step {state.stage_step}, "
                  f"global step {state.global_step}", flush=True)

    tracker = Tracker(cfg, output_dir, rank == 0, resume_step=state.global_step, run_id=state.wandb_run_id,
                      model=lm, world=world)
    state.wandb_run_id = tracker.run_id
    job = Job(cfg, engine, lm, loaded.tokenizer, plans, state, tracker, StopRequest.install(), ckpt_root, rank, world)
    result = RunResult(checkpoint_dir=ckpt_root)
    failed = True
    try:
        while state.stage_index < len(cfg.stages):
            summary = _run_stage(job, state.stage_index)
            result.summaries.append(summary)
            if rank == 0:
                print(f"\nstage {summary.name} done\n{format_table([summary])}\n", flush=True)
        if rank == 0 and result.summaries:
            print(f"run {cfg.run_name} finished\n{format_table(result.summaries)}", flush=True)
        if cfg.trainer.export:
            result.export_dir = _export(job, output_dir / "hf_model")
        failed = False
    except Exception as e:
        if is_oom(e):
            stage = cfg.stages[min(state.stage_index, len(cfg.stages) - 1)]
            raise RuntimeError(explain_oom(cfg, stage)) from e
        raise
    finally:
        job.stop.uninstall()
        tracker.finish(failed=failed)
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


def _transition_message(stage: StageConfig, index: int, plan: AttentionPlan, sp: int) -> str:
    co = stage.carry_over
    kept = ["weights", "global step", "RNG"]
    restarted = []
    if index:
        (kept if co.optimizer_state else restarted).append("Adam moments")
        (kept if co.data_position else restarted).append("data position")
        restarted.append("LR schedule" + (" (no warmup)" if co.lr_schedule else ""))
    return (f"stage {index} '{stage.name}': {stage.mode}, seq_len {stage.seq_len}, micro-batch "
            f"{stage.micro_batch_size} x accum {stage.grad_accum}, sequence parallel {sp}, rope "
            f"{stage.rope.theta or 'unchanged'}{' ' + str(stage.rope.scaling) if stage.rope.scaling else ''}, "
            f"attention {plan.describe()}; carried over: {', '.join(kept)}"
            + (f"; restarted: {', '.join(restarted)}" if restarted else ""))


def _run_stage(job: Job, index: int) -> StageSummary:
    cfg, engine, state = job.cfg, job.engine, job.state
    stage, plan = cfg.stages[index], job.plans[index]
    sp = stage_sequence_parallel(cfg, stage)
    lay = layout(sp)
    fresh = state.stage_step == 0

    if stage.rope.theta is not None or stage.rope.scaling is not None:
        set_rope(job.lm, theta=stage.rope.theta, scaling=stage.rope.scaling)
    attach_plan(job.lm, plan)
    apply_sequence_parallel(job.lm, sp)
    set_stage_batch(engine, stage, lay.world)
    if fresh and index > 0 and not stage.carry_over.optimizer_state:
        _reset_optimizer_state(engine)
    total = stage_steps(stage, lay.dp)
    if cfg.debug.max_steps_per_stage:
        total = min(total, cfg.debug.max_steps_per_stage)
    carried = fresh and index > 0 and stage.carry_over.data_position
    stream = build_stream(cfg, index, job.tokenizer, lay.dp_rank, lay.dp,
                          resume_state=None if fresh else state.data_state,
                          previous_stage_state=state.data_state if carried else None)
    if job.rank == 0:
        print(_transition_message(stage, index, plan, sp), flush=True)
        print(stream.report(), flush=True)
    job.tracker.stage_started(index, stage, plan, step=state.global_step)

    summary = StageSummary(stage.name, stage.seq_len, stage.mode, plan=plan.describe())
    progress = StageProgress(f"{index + 1}/{len(cfg.stages)} {stage.name}", total, state.stage_step,
                             enabled=job.rank == 0)
    lr_cfg = dataclasses.replace(stage.lr, warmup=0.0) if stage.carry_over.lr_schedule and index else stage.lr
    bad_in_a_row = 0
    started = time.perf_counter()
    while state.stage_step < total:
        changed = plan.set_progress(state.stage_step / total)
        lr = lr_at(state.stage_step, total, lr_cfg)
        set_lr(engine, lr)
        started_step = time.perf_counter()
        packs = [next(stream) for _ in range(stage.grad_accum)]
        data_seconds = time.perf_counter() - started_step
        batches = [shard_batch(p, lay.sp_rank, sp) for p in packs]
        poison = job.rank == 0 and state.global_step + 1 in cfg.debug.poison_loss_at_steps
        with job.tracker.routing_probe(job.lm, plan, state.stage_step, state.global_step + 1, stage.seq_len):
            step = train_step(engine, batches, grad_divisor=lay.world, clip=cfg.trainer.grad_clip, poison=poison)
        timing = StepTiming(time.perf_counter() - started_step, data_seconds)
        state.stage_step += 1
        state.global_step += 1
        state.tokens_seen += step.tokens
        state.data_state = stream.state_dict()
        if step.skipped:
            state.bad_steps_total += 1
            summary.skipped_steps += 1
            bad_in_a_row += 1
            if bad_in_a_row >= cfg.trainer.max_bad_steps:
                raise RuntimeError(f"{bad_in_a_row} steps in a row had a NaN/inf loss (stage {stage.name}, global step "
                                   f"{state.global_step}); lower stages[{index}].lr.peak, check the data, or raise "
                                   f"trainer.max_bad_steps")
        else:
            bad_in_a_row = 0
            summary.first_loss = step.loss if summary.first_loss is None else summary.first_loss
            summary.last_loss = step.loss
        summary.steps += 1
        summary.tokens += step.tokens
        job.tracker.log_step(state.global_step, index, stage, step, lr, plan, packs=packs, sp=sp, timing=timing)
        progress.update(step.tokens, step.loss, lr, plan.describe() if changed else None)

        if cfg.debug.interrupt_after_step == state.global_step:
            os.kill(os.getpid(), signal.SIGINT)
        stop_now = job.stop.requested()
        periodic = cfg.trainer.checkpoint_every and state.global_step % cfg.trainer.checkpoint_every == 0
        if stop_now or (periodic and state.stage_step < total):
            _save(job, sp)
        if stop_now:
            progress.close()
            raise SystemExit(f"stopped by signal after global step {state.global_step}; checkpoint written to "
                             f"{job.ckpt_root}; run the same command again to resume")
        if cfg.debug.crash_after_step is not None and state.global_step >= cfg.debug.crash_after_step:
            os._exit(17)   # tests: die like a killed process, without any cleanup
    progress.close()
    summary.seconds = time.perf_counter() - started

    if stage.eval and cfg.trainer.eval_batches > 0:
        batches = stream.validation_batches(max_packs=cfg.trainer.eval_batches * stage.micro_batch_size * lay.dp)
        ev = evaluate_position_loss(engine.module, [shard_batch(b, lay.sp_rank, sp) for b in batches], stage.seq_len,
                                    buckets=cfg.eval.position_buckets, tail_tokens=cfg.eval.tail_tokens)
        summary.val_loss, summary.tail_loss = ev.mean_loss, ev.tail_loss
        job.tracker.log_eval(state.global_step, index, stage, ev)
    passkey = stage_passkey(job.lm, job.tokenizer, cfg, stage, sp, engine.zero_optimization_stage() == 3, job.world)
    if passkey is not None:
        summary.passkey = passkey.accuracy
        job.tracker.log_passkey(state.global_step, index, stage, passkey)
        if job.rank == 0:
            print(describe_passkey(passkey), flush=True)
    log.info("%s", stream.report())

    # The stage-end checkpoint points at the start of the next stage.
    state.stage_index += 1
    state.stage_step = 0
    following = cfg.stages[state.stage_index] if state.stage_index < len(cfg.stages) else None
    if following is None or not following.carry_over.data_position:
        state.data_state = {}
    _save(job, sp)
    job.tracker.stage_finished(index, summary, step=state.global_step)
    if cfg.eval.plots and job.rank == 0:
        job.tracker.log_plots(plots_from_metrics(job.tracker.output_dir), state.global_step)
    return summary


def _save(job: Job, sp: int) -> None:
    job.state.world = {"world": job.world, "sp": sp}
    checkpoint.save(job.engine, job.ckpt_root, job.state, job.cfg.trainer.keep_checkpoints)


def _reset_optimizer_state(engine) -> None:
    """Forget Adam moments (carry_over.optimizer_state: false): the base optimizer restarts them lazily."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    base.state.clear()


def _export(job: Job, target: Path) -> Path:
    """The final model in Hugging Face format (rank 0 writes; ZeRO-3 partitions are gathered first)."""
    plan = job.plans[-1]
    if job.engine.zero_optimization_stage() == 3:
        full = job.engine._zero3_consolidated_16bit_state_dict()   # collective: every rank takes part
        if job.rank == 0:
            lm_state = {k[len("lm."):]: v for k, v in full.items() if k.startswith("lm.")}
            export_model(job.lm, job.tokenizer, target, plan, state_dict=lm_state, overwrite=True)
    elif job.rank == 0:
        export_model(job.lm, job.tokenizer, target, plan, overwrite=True)
    dist.barrier()
    if job.rank == 0:
        print(f"Hugging Face model written to {target}", flush=True)
    return target
