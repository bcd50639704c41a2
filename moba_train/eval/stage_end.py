"""What the trainer evaluates when a stage ends (or part-way, stages[].eval_at): validation loss by position,
passkey retrieval on each configured haystack, plots.

Each evaluation runs on its own: one that raises is recorded (console, metrics.jsonl, wandb) with its
error and, where known, the fix, and the others still run. The trainer has written the stage's
checkpoint before any of this starts, so nothing here can cost the stage's training.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from moba_train.distributed.ulysses import apply_sequence_parallel, shard_batch

from .passkey import PasskeyResult, describe, passkey_lengths, run_passkey
from .plots import PLOT_DIR, write_plots
from .position_loss import PositionLoss, evaluate_position_loss

log = logging.getLogger(__name__)


def passkey_cap(cfg) -> int:
    pk = cfg.eval.passkey
    return pk.max_length if torch.cuda.is_available() else pk.max_length_cpu


@dataclass
class StageEvaluation:
    """Everything the stage-end evaluations of one stage need."""

    module: torch.nn.Module          # the loss module (moba_train.job.lm.PackedCausalLM), possibly DeepSpeed's
    lm: torch.nn.Module              # the transformers model it wraps
    tokenizer: object
    cfg: object                      # RunConfig
    stage: object                    # Stage
    stream: object                   # the stage's StageData (its held-out documents)
    dp: int = 1
    sp_rank: int = 0
    zero3: bool = False
    world: int = 1
    is_main: bool = True
    tags: dict = field(default_factory=dict)   # added to every record: stage_step, tokens_seen, part_way (its index)


@dataclass
class EvalError:
    evaluation: str                  # position_loss | passkey | plots
    error: str
    fix: str

    def __str__(self) -> str:
        return f"{self.evaluation}: {self.error}; {self.fix}"


@dataclass
class StageEvalOutcome:
    position_loss: PositionLoss | None = None
    passkey: list[PasskeyResult] = field(default_factory=list)   # one per haystack style
    plots: dict[str, Path] = field(default_factory=dict)
    errors: list[EvalError] = field(default_factory=list)


def explain_eval_error(evaluation: str, error: BaseException, stage) -> str:
    """The fix for an evaluation that raised, where one is known."""
    text = str(error)
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return ("it ran out of memory: lower eval.passkey.max_length (the longest haystack generated on one GPU) "
                "or trainer.eval_batches" if evaluation == "passkey" else "it ran out of memory: lower "
                                                                           "trainer.eval_batches")
    skip = {"position_loss": f"stages[{stage.index}].eval=false or trainer.eval_batches=0",
            "passkey": "eval.passkey.enabled=false", "plots": "eval.plots=false"}[evaluation]
    return (f"the stage's checkpoint is kept; `moba-train mode=eval checkpoint=<its checkpoint>` repeats the "
            f"evaluation, and {skip} skips it")


def _position_loss(ev: StageEvaluation) -> PositionLoss | None:
    cfg, stage = ev.cfg, ev.stage
    if not stage.eval or cfg.trainer.eval_batches < 1:
        return None
    batches = ev.stream.validation_batches(max_packs=cfg.trainer.eval_batches * stage.micro_batch_size * ev.dp)
    return evaluate_position_loss(ev.module, [shard_batch(b, ev.sp_rank, stage.sequence_parallel) for b in batches],
                                  stage.seq_len, buckets=cfg.eval.position_buckets, tail_tokens=cfg.eval.tail_tokens)


def stage_passkey(ev: StageEvaluation) -> list[PasskeyResult]:
    """Passkey at the stage's length (or the configured lengths up to it), one result per haystack style;
    none when off or all capped.

    Generation runs without sequence parallelism (each rank decodes the whole haystack; the cap bounds
    the KV cache that needs); every rank runs the same trials so that ZeRO-3's gathers line up."""
    cfg, stage = ev.cfg, ev.stage
    pk = cfg.eval.passkey
    if not (stage.eval and pk.enabled):
        return []
    lengths, skipped = passkey_lengths(pk.lengths, stage.seq_len, passkey_cap(cfg))
    if not lengths:
        if skipped:
            log.info("passkey skipped at stage %s: haystack lengths %s exceed the cap (eval.passkey.max_length%s)",
                     stage.name, skipped, "" if torch.cuda.is_available() else "_cpu")
        return []
    sp = stage.sequence_parallel
    if sp > 1:
        apply_sequence_parallel(ev.lm, 1)
    try:
        results = [run_passkey(ev.lm, ev.tokenizer, lengths, pk.depths, samples=pk.samples, seed=pk.seed,
                               batch_tokens=pk.batch_tokens, synced_gpus=ev.zero3 and ev.world > 1,
                               haystacks=style) for style in pk.haystacks]
    finally:
        if sp > 1:
            apply_sequence_parallel(ev.lm, sp)
    for result in results:
        result.skipped_lengths = skipped
    return results


def plots_from_metrics(output_dir: Path) -> dict[str, Path]:
    from moba_train.tracking.metrics_file import FILE_NAME, read_records

    return write_plots(read_records(output_dir / FILE_NAME), output_dir / PLOT_DIR)


def _inject_fault(name: str, faults: list[str]) -> None:
    """Tests (debug.fail_evaluations): "<name>" makes that evaluation raise, "<name>:kill" dies like kill -9,
    "<name>:interrupt" gets a Ctrl-C."""
    if name in faults:
        raise RuntimeError(f"injected failure of {name} (debug.fail_evaluations)")
    if f"{name}:kill" in faults:
        os._exit(17)
    if f"{name}:interrupt" in faults:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)                     # the handler raises before this returns


def _failed_on_any_rank(failed: bool, world: int) -> bool:
    """Every rank learns whether any rank's evaluation failed, so that all of them go on alike."""
    if world == 1 or not dist.is_initialized():
        return failed
    flag = torch.tensor([float(failed)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def evaluate_stage_end(ev: StageEvaluation, tracker, step: int) -> StageEvalOutcome:
    """Run, record and return the stage-end evaluations; a failing one is recorded, not raised.

    KeyboardInterrupt and SystemExit pass through: the checkpoint written before keeps the stage."""
    outcome = StageEvalOutcome()
    seconds: dict[str, float] = {}        # wall time of each evaluation, into its records

    def attempt(name: str, fn, collective: bool = True):
        error = None
        started = time.perf_counter()
        try:
            _inject_fault(name, ev.cfg.debug.fail_evaluations)
            result = fn()
        except Exception as e:            # noqa: BLE001 - every failure is recorded with its fix
            result, error = None, e
            log.debug("stage-end %s failed:\n%s", name, traceback.format_exc())
        seconds[name] = round(time.perf_counter() - started, 3)
        if collective and _failed_on_any_rank(error is not None, ev.world) and error is None:
            error = RuntimeError("failed on another rank")
        if error is None:
            return result
        record = EvalError(name, f"{type(error).__name__}: {error}", explain_eval_error(name, error, ev.stage))
        outcome.errors.append(record)
        tracker.log_eval_error(step, ev.stage, record, tags=ev.tags)
        return None

    outcome.position_loss = attempt("position_loss", lambda: _position_loss(ev))
    if outcome.position_loss is not None:
        tracker.log_eval(step, ev.stage, outcome.position_loss, tags={**ev.tags, "seconds": seconds["position_loss"]})
    outcome.passkey = attempt("passkey", lambda: stage_passkey(ev)) or []
    for result in outcome.passkey:        # seconds: the whole passkey evaluation, every haystack
        tracker.log_passkey(step, ev.stage, result, tags={**ev.tags, "seconds": seconds["passkey"]})
        if ev.is_main:
            print(describe(result), flush=True)
    if ev.cfg.eval.plots and ev.is_main:
        outcome.plots = attempt("plots", lambda: plots_from_metrics(tracker.output_dir), collective=False) or {}
        tracker.log_plots(outcome.plots, step)
    return outcome
