"""The staged training job: check, load, then for each resolved stage enter it, train it, finish it.

What a stage inherits from the one before (logged at every transition):
  always       weights, global step, RNG streams
  by default   Adam moments                      (carry_over.optimizer_state: true)
  restarts     the LR schedule with its warmup   (carry_over.lr_schedule: true skips the warmup)
               the data position                 (carry_over.data_position: true continues the previous
                                                  stage's stream; the data configs must then match)
Everything else a stage runs with (RoPE, attention plan, sequence parallelism, batch) is its resolved
`Stage`'s, set when the stage is entered, so a resumed run trains exactly what the uninterrupted one does.

A stage ends by writing its checkpoint, then evaluating: an evaluation that fails never costs the
stage's training (see `finish_stage`). Part-way evaluations (stages[].eval_at) do the same inside the stage.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from moba_train.config import RunConfig, Stage
from moba_train.errors import UserError
from moba_train.distributed.groups import layout
from moba_train.distributed.ulysses import apply_sequence_parallel, shard_batch
from moba_train.eval.stage_end import StageEvaluation, evaluate_stage_end
from moba_train.job import checkpoint_files
from moba_train.job.lm import PackedCausalLM
from moba_train.job.model_setup import load_for_training, model_dtype
from moba_train.job.preflight import check_stage_data, preflight
from moba_train.job.stage_data import build_stream
from moba_train.models import AttentionPlan, attach_plan, export_model, set_rope
from moba_train.models.attention import backend_choices
from moba_train.models.hf_compat import head_dim_of
from moba_train.tracking import StepTiming, Tracker

from . import checkpoint
from .engine import build_engine, init_distributed, set_lr, set_stage_batch
from .failures import RunStopped, StopNow, StopRequest, explain_oom, is_oom
from .progress import StageProgress, StageSummary, format_table
from .schedule import lr_at
from .step import train_step

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    summaries: list[StageSummary] = field(default_factory=list)
    export_dir: Path | None = None
    checkpoint_dir: Path | None = None
    losses: list[float] = field(default_factory=list)
    already_finished: bool = False


@dataclass
class Job:
    """What every stage of one run works with."""

    cfg: RunConfig
    engine: object
    lm: torch.nn.Module
    tokenizer: object
    plans: list[AttentionPlan]
    state: checkpoint_files.TrainState
    tracker: Tracker
    stop: StopRequest
    ckpt_root: Path
    rank: int
    world: int
    saved_step: int | None = None                          # global step of the newest checkpoint of this run
    listed_skips: set[str] = field(default_factory=set)   # sources whose skipped records were printed in full


@dataclass
class StageRun:
    """One stage in progress: what enter_stage set up for the step loop and finish_stage."""

    stage: Stage
    plan: AttentionPlan
    stream: object
    total: int
    summary: StageSummary
    dp_rank: int
    dp: int
    sp_rank: int
    part_way_steps: tuple[int, ...] = ()                   # stage steps after which it is evaluated part-way


def export_dir(cfg: RunConfig) -> Path:
    return Path(cfg.paths.output_dir).expanduser() / "hf_model"


def train(cfg: RunConfig) -> RunResult:
    """The whole job. Raises RunStopped (exit 0, resumable) when a signal stopped it with nothing lost."""
    stop = StopRequest.install()
    try:
        return _train(cfg, stop)
    except StopNow as e:
        # the first Ctrl-C/SIGTERM outside the step loop: every step already taken is in the newest checkpoint
        found = checkpoint.candidates(Path(cfg.paths.output_dir).expanduser() / "checkpoints")
        where = found[0] if found else None
        raise RunStopped(f"stopped by {e} before the next step; "
                         + (f"the newest checkpoint {where} is complete" if where else "no checkpoint was written yet")
                         + "; run the same command again to resume") from None
    finally:
        stop.uninstall()


def _train(cfg: RunConfig, stop: StopRequest) -> RunResult:
    init_distributed(cfg.trainer.dist_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    output_dir = Path(cfg.paths.output_dir).expanduser()
    ckpt_root = output_dir / "checkpoints"
    resume_from = _resume_source(cfg, ckpt_root)
    state = checkpoint_files.read_state(resume_from) if resume_from else checkpoint_files.TrainState()
    if _finished(cfg, state):
        if rank == 0:
            print(f"run {cfg.run_name} already finished at global step {state.global_step} ({resume_from}); nothing "
                  f"to do" + (f". Its export is {export_dir(cfg)}: delete it to write it again" if cfg.trainer.export
                              else ""), flush=True)
        return RunResult(checkpoint_dir=ckpt_root, already_finished=True)
    preflight(cfg, world)                                     # every check that needs no weights
    torch.manual_seed(cfg.trainer.seed)

    loaded = load_for_training(cfg)
    check_stage_data(cfg, loaded.tokenizer)                   # every stage's data, before the first step
    lm = loaded.model
    plans = [AttentionPlan.from_config(s.attention, lm.config.num_hidden_layers) for s in cfg.stages]

    current = min(state.stage_index, len(cfg.stages) - 1)
    attach_plan(lm, plans[current])
    universal = bool(resume_from) and state.world.get("world", world) != world
    if universal:
        checkpoint.convert_to_universal(resume_from)
    engine = build_engine(PackedCausalLM(lm, cfg.trainer.loss_chunk_tokens), cfg, cfg.stages[current],
                          load_universal=universal)
    if resume_from:
        _check_conventions(cfg, state, resume_from)
        checkpoint.load(engine, resume_from, universal)
        if rank == 0:
            print(f"resumed from {resume_from}: stage {state.stage_index}, stage step {state.stage_step}, "
                  f"global step {state.global_step}", flush=True)

    tracker = Tracker(cfg, output_dir, rank == 0, resume_step=state.global_step if resume_from else -1,
                      run_id=state.wandb_run_id, model=lm, world=world, pending_eval_stage=state.eval_pending,
                      part_way_done=(state.stage_index, state.part_way_evals_done))
    state.wandb_run_id = tracker.run_id
    job = Job(cfg, engine, lm, loaded.tokenizer, plans, state, tracker, stop, ckpt_root, rank, world,
              saved_step=state.global_step if resume_from else None)
    result = RunResult(checkpoint_dir=ckpt_root)
    status = "failed"
    try:
        if state.eval_pending is not None:                   # the run stopped while evaluating a finished stage
            result.summaries.append(_evaluate_pending(job, cfg.stages[state.eval_pending]))
        while state.stage_index < len(cfg.stages):
            summary = run_stage(job, cfg.stages[state.stage_index])
            result.summaries.append(summary)
            if rank == 0:
                print(f"\nstage {summary.name} done\n{format_table([summary])}\n", flush=True)
        if rank == 0 and result.summaries:
            print(f"run {cfg.run_name} finished\n{format_table(result.summaries)}", flush=True)
        if cfg.trainer.export:
            result.export_dir = _export(job, export_dir(cfg))
        status = "finished"
    except (RunStopped, StopNow):
        status = "stopped"
        raise
    except Exception as e:
        if is_oom(e):
            stage = cfg.stages[min(state.stage_index, len(cfg.stages) - 1)]
            raise RuntimeError(explain_oom(cfg, stage)) from e
        raise
    finally:
        tracker.finish(status, step=state.global_step)
    result.losses = tracker.losses
    return result


def _finished(cfg: RunConfig, state: checkpoint_files.TrainState) -> bool:
    """Every stage trained and evaluated, and the export (if asked for) written."""
    done = state.stage_index >= len(cfg.stages) and state.eval_pending is None
    return done and (not cfg.trainer.export or (export_dir(cfg) / "config.json").is_file())


def _check_conventions(cfg: RunConfig, state: checkpoint_files.TrainState, ckpt: Path) -> None:
    """A resumed stage must route as it did before the checkpoint: the same centroids convention."""
    trained = cfg.stages[:state.stage_index + (1 if state.stage_step else 0)]
    recorded = state.centroids if state.centroids is not None else {s.name: "fp32" for s in trained}
    for stage in trained:
        was = recorded.get(stage.name)
        if was is not None and was != stage.attention.centroids:
            raise UserError(f"checkpoint {ckpt} trained {stage.where} with attention centroids={was!r}, the recipe now "
                            f"says {stage.attention.centroids!r} (checkpoints written before the setting existed used "
                            f"'fp32'); set attention.centroids={was} to continue the run as it was trained, or "
                            f"trainer.resume=never to start over")


def _resume_source(cfg: RunConfig, ckpt_root: Path) -> Path | None:
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        return checkpoint.find_resumable(ckpt_root, cfg.trainer.on_corrupt_checkpoint)
    path = Path(mode).expanduser()
    if not checkpoint_files.is_checkpoint(path):
        raise ValueError(f"trainer.resume={mode}: not a complete moba-train checkpoint (no "
                         f"{checkpoint_files.STATE_FILE}); use resume=auto, resume=never or a directory under "
                         f"<output_dir>/checkpoints/")
    checkpoint.verify(path)
    return path


def _transition_message(stage: Stage, plan: AttentionPlan, backends: dict[str, str]) -> str:
    co = stage.carry_over
    kept = ["weights", "global step", "RNG"]
    restarted = []
    if stage.index:
        (kept if co.optimizer_state else restarted).append("Adam moments")
        (kept if co.data_position else restarted).append("data position")
        restarted.append("LR schedule" + (" (no warmup)" if co.lr_schedule else ""))
    ran = ", ".join(f"{kind} on {name}" for kind, name in backends.items())
    return (f"stage {stage.index} '{stage.name}': {stage.mode}, seq_len {stage.seq_len}, micro-batch "
            f"{stage.micro_batch_size} x accum {stage.grad_accum}, sequence parallel {stage.sequence_parallel}, rope "
            f"{stage.rope.describe()}, attention {plan.describe()} ({ran}); carried over: {', '.join(kept)}"
            + (f"; restarted: {', '.join(restarted)}" if restarted else ""))


def _set_stage_model(job: Job, stage: Stage, progress: float) -> AttentionPlan:
    """The model as `stage` trains it: its RoPE, its plan at `progress`, its sequence parallelism."""
    if stage.rope.changes_model:
        set_rope(job.lm, theta=stage.rope.theta, scaling=stage.rope.scaling)
    plan = job.plans[stage.index]
    plan.set_progress(progress)
    attach_plan(job.lm, plan)
    apply_sequence_parallel(job.lm, stage.sequence_parallel)
    return plan


def enter_stage(job: Job, stage: Stage) -> StageRun:
    cfg, state = job.cfg, job.state
    lay = layout(stage.sequence_parallel)
    fresh = state.stage_step == 0
    total = stage.total_steps(lay.dp)
    if cfg.debug.max_steps_per_stage:
        total = min(total, cfg.debug.max_steps_per_stage)
    plan = _set_stage_model(job, stage, min(1.0, state.stage_step / total))
    set_stage_batch(job.engine, stage, lay.world)
    if fresh and stage.index > 0 and not stage.carry_over.optimizer_state:
        _reset_optimizer_state(job.engine)
    carried = fresh and stage.index > 0 and stage.carry_over.data_position
    stream = build_stream(cfg, stage, job.tokenizer, lay.dp_rank, lay.dp,
                          resume_state=None if fresh else state.data_state,
                          previous_stage_state=state.data_state if carried else None)
    backends = backend_choices(plan, job.engine.device, model_dtype(cfg), head_dim_of(job.lm.config))
    log.info("stage %s backends: %s", stage.name, ", ".join(f"{k}={v}" for k, v in backends.items()))
    if job.rank == 0:
        print(_transition_message(stage, plan, backends), flush=True)
        print(stream.report(listed=job.listed_skips), flush=True)
    job.tracker.stage_started(stage, plan, step=state.global_step, backends=backends)
    schedule = " then ".join(plan.describe(p) for p in plan.phase_starts())
    summary = job.tracker.stage_summary(stage, schedule, backends)   # counts the steps before a resume too
    return StageRun(stage, plan, stream, total, summary, lay.dp_rank, lay.dp, lay.sp_rank,
                    part_way_steps=stage.part_way_eval_steps(total))


def train_steps(job: Job, run: StageRun) -> None:
    """The stage's optimizer steps from where the state stands to the stage's total."""
    cfg, engine, state, stage, plan = job.cfg, job.engine, job.state, run.stage, run.plan
    sp = stage.sequence_parallel
    progress = StageProgress(f"{stage.index + 1}/{len(cfg.stages)} {stage.name}", run.total, state.stage_step,
                             enabled=job.rank == 0)
    bad_in_a_row = 0
    started = time.perf_counter()
    try:
        with job.stop.deferring():        # a signal here ends the step, writes a checkpoint, then stops
            while True:
                _evaluate_part_way(job, run)
                if state.stage_step >= run.total:
                    break
                changed = plan.set_progress(state.stage_step / run.total)
                lr = lr_at(state.stage_step, run.total, stage.lr)
                set_lr(engine, lr)
                started_step = time.perf_counter()
                packs = [next(run.stream) for _ in range(stage.grad_accum)]
                data_seconds = time.perf_counter() - started_step
                batches = [shard_batch(p, run.sp_rank, sp) for p in packs]
                poison = job.rank == 0 and state.global_step + 1 in cfg.debug.poison_loss_at_steps
                probe = job.tracker.routing_probe(job.lm, plan, state.stage_step, state.global_step + 1, stage.seq_len)
                with probe:
                    step = train_step(engine, batches, grad_divisor=layout(sp).world, clip=cfg.trainer.grad_clip,
                                      poison=poison)
                timing = StepTiming(time.perf_counter() - started_step, data_seconds)
                state.stage_step += 1
                state.global_step += 1
                state.tokens_seen += step.tokens
                state.data_state = run.stream.state_dict()
                state.plan_progress = plan.progress
                run.summary.add_step(step)
                if step.skipped:
                    state.bad_steps_total += 1
                    bad_in_a_row += 1
                    if bad_in_a_row >= cfg.trainer.max_bad_steps:
                        raise RuntimeError(f"{bad_in_a_row} steps in a row had a NaN/inf loss (stage {stage.name}, "
                                           f"global step {state.global_step}); lower stages[{stage.index}].lr.peak, "
                                           f"check the data, or raise trainer.max_bad_steps")
                else:
                    bad_in_a_row = 0
                job.tracker.log_step(state.global_step, stage, step, lr, plan, packs=packs, sp=sp, timing=timing)
                progress.update(step.tokens, step.loss, lr, plan.describe() if changed else None)

                if cfg.debug.interrupt_after_step == state.global_step:
                    os.kill(os.getpid(), signal.SIGINT)
                stop_now = job.stop.requested()
                periodic = cfg.trainer.checkpoint_every and state.global_step % cfg.trainer.checkpoint_every == 0
                if stop_now or (periodic and state.stage_step < run.total):
                    _save(job, sp)
                if stop_now:
                    raise RunStopped(f"stopped by signal after global step {state.global_step}; checkpoint written "
                                     f"to {job.ckpt_root}; run the same command again to resume")
                if cfg.debug.crash_after_step is not None and state.global_step >= cfg.debug.crash_after_step:
                    os._exit(17)   # tests: die like a killed process, without any cleanup
    finally:
        progress.close()
    run.summary.seconds += time.perf_counter() - started


def finish_stage(job: Job, run: StageRun) -> StageSummary:
    """The stage's checkpoint first (pointing at the next stage), then its evaluations.

    Until they complete, the checkpoint says that this stage's evaluation is pending: a crash or Ctrl-C
    while evaluating resumes into the evaluation, never into the stage's training again."""
    state, stage = job.state, run.stage
    run.plan.set_progress(1.0)                      # the stage ends where its schedule ends
    state.plan_progress = 1.0
    state.stage_index += 1
    state.stage_step = 0
    state.part_way_evals_done = 0
    following = job.cfg.stages[state.stage_index] if state.stage_index < len(job.cfg.stages) else None
    if following is None or not following.carry_over.data_position:
        state.data_state = {}
    state.eval_pending = stage.index
    with job.stop.deferring():
        _save(job, stage.sequence_parallel)
    if job.stop.requested():
        raise RunStopped(f"stopped after stage {stage.name}'s checkpoint ({job.ckpt_root}); running the same command "
                         f"again evaluates the stage and goes on")
    _evaluate(job, run)
    return run.summary


def _evaluate_part_way(job: Job, run: StageRun) -> None:
    """The part-way evaluation due at this step of the stage, if any (stages[].eval_at): a checkpoint of the
    steps so far first (unless one was written at this step), then the evaluations, a signal stopping them at
    once. The checkpoint counts the evaluation as pending until it completes, so a resume repeats only it."""
    state, steps = job.state, run.part_way_steps
    while state.part_way_evals_done < len(steps) and steps[state.part_way_evals_done] < state.stage_step:
        log.warning("%s: the part-way evaluation after step %d was not run (the run resumed past it with another "
                    "eval_at or batch)", run.stage.where, steps[state.part_way_evals_done])
        state.part_way_evals_done += 1
    if state.part_way_evals_done >= len(steps) or steps[state.part_way_evals_done] != state.stage_step:
        return
    if job.saved_step != state.global_step and state.global_step > 0:
        _save(job, run.stage.sequence_parallel)
        if job.stop.requested():
            raise RunStopped(f"stopped by signal after global step {state.global_step}; checkpoint written to "
                             f"{job.ckpt_root}; run the same command again to resume")
    if job.rank == 0:
        print(f"stage {run.stage.name}: part-way evaluation {state.part_way_evals_done + 1}/{len(steps)} after "
              f"{state.stage_step} of {run.total} steps", flush=True)
    with job.stop.immediate():
        _evaluate(job, run, part_way=state.part_way_evals_done)


def _evaluate(job: Job, run: StageRun, part_way: int | None = None) -> None:
    """The stage's evaluations: at its end (part_way None), or its `part_way`-th part-way one."""
    stage, state = run.stage, job.state
    evaluation = StageEvaluation(job.engine.module, job.lm, job.tokenizer, job.cfg, stage, run.stream,
                                 dp=run.dp, sp_rank=run.sp_rank, zero3=job.engine.zero_optimization_stage() == 3,
                                 world=job.world, is_main=job.rank == 0,
                                 tags={"stage_step": state.stage_step, "tokens_seen": state.tokens_seen,
                                       **({"part_way": part_way} if part_way is not None else {})})
    outcome = evaluate_stage_end(evaluation, job.tracker, step=state.global_step)
    if part_way is not None:
        if outcome.errors and job.cfg.eval.on_error == "fail":
            raise RuntimeError(f"{stage.where}: the part-way evaluation after step {state.stage_step} failed "
                               f"({outcome.errors[0]}). The checkpoint of the steps before it is kept; fix the cause "
                               f"and run the same command again to repeat the evaluation and go on, or set "
                               f"eval.on_error=continue")
        state.part_way_evals_done += 1
        if job.saved_step == state.global_step:
            checkpoint.mark_evaluated(job.ckpt_root, state)
        return
    run.summary.record(outcome)
    if outcome.errors and job.cfg.eval.on_error == "fail":
        # The checkpoint still says the evaluation is pending: the next run repeats only the evaluation.
        raise RuntimeError(f"{stage.where}: the stage-end evaluation failed ({outcome.errors[0]}). The stage's "
                           f"checkpoint is kept; fix the cause and run the same command again to repeat the evaluation "
                           f"and go on, or set eval.on_error=continue")
    job.tracker.stage_finished(stage, run.summary, step=job.state.global_step)
    job.state.eval_pending = None
    checkpoint.mark_evaluated(job.ckpt_root, job.state)


def _evaluate_pending(job: Job, stage: Stage) -> StageSummary:
    """Finish the interrupted evaluation of `stage` (already trained and checkpointed)."""
    lay = layout(stage.sequence_parallel)
    plan = _set_stage_model(job, stage, 1.0)
    stream = build_stream(job.cfg, stage, job.tokenizer, lay.dp_rank, lay.dp)
    if job.rank == 0:
        print(f"stage {stage.index} '{stage.name}' was trained and checkpointed; finishing its evaluation", flush=True)
    backends = backend_choices(plan, job.engine.device, model_dtype(job.cfg), head_dim_of(job.lm.config))
    schedule = " then ".join(plan.describe(p) for p in plan.phase_starts())
    run = StageRun(stage, plan, stream, 0, job.tracker.stage_summary(stage, schedule, backends), lay.dp_rank, lay.dp,
                   lay.sp_rank)
    _evaluate(job, run)
    return run.summary


def run_stage(job: Job, stage: Stage) -> StageSummary:
    run = enter_stage(job, stage)
    train_steps(job, run)
    return finish_stage(job, run)


def _save(job: Job, sp: int) -> None:
    job.state.world = {"world": job.world, "sp": sp}
    trained = job.cfg.stages[:min(job.state.stage_index + 1, len(job.cfg.stages))]
    job.state.centroids = {s.name: s.attention.centroids for s in trained}
    checkpoint.save(job.engine, job.ckpt_root, job.state, job.cfg.trainer.keep_checkpoints)
    job.saved_step = job.state.global_step


def _reset_optimizer_state(engine) -> None:
    """Forget Adam moments (carry_over.optimizer_state: false): the base optimizer restarts them lazily."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    base.state.clear()


def _export(job: Job, target: Path) -> Path:
    """The final model in Hugging Face format (rank 0 writes; ZeRO-3 partitions are gathered first), as the last
    stage left it, its config recording the longest context trained."""
    last = job.cfg.stages[-1]
    plan = _set_stage_model(job, last, 1.0)
    trained_context = max(s.seq_len for s in job.cfg.stages)
    if job.engine.zero_optimization_stage() == 3:
        full = job.engine._zero3_consolidated_16bit_state_dict()   # collective: every rank takes part
        if job.rank == 0:
            lm_state = {k[len("lm."):]: v for k, v in full.items() if k.startswith("lm.")}
            export_model(job.lm, job.tokenizer, target, plan, state_dict=lm_state, overwrite=True,
                         trained_context=trained_context)
    elif job.rank == 0:
        export_model(job.lm, job.tokenizer, target, plan, overwrite=True, trained_context=trained_context)
    dist.barrier()
    if job.rank == 0:
        print(f"Hugging Face model written to {target}", flush=True)
    return target
