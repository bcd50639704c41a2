"""One optimizer step over grad_accum micro-batches: token-weighted loss, NaN/inf skipping."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moba_train.job.lm import to_device


@dataclass
class StepResult:
    loss: float                 # mean token loss over every targeted token of the step, all ranks
    target_tokens: int          # tokens with a target, all ranks
    tokens: int                 # tokens processed, all ranks
    grad_norm: float | None
    skipped: bool               # a NaN/inf loss: no update was applied


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op)
    return t.tolist()


def target_count(batch: dict) -> int:
    return int((batch["shift_labels"] != -100).sum())


def _zero0_boundary(engine, bad: bool, clip: float) -> float | None:
    """ZeRO-0, after the last backward (gradients all-reduced, whole and identical on every rank): drop the
    gradients of a bad step, so the optimizer skips every parameter, else clip them and return their norm.
    DeepSpeed's stage-0 clipping is switched off (engine.deepspeed_config): it fails on a step without
    gradients and discards the norm it computes."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if bad:
        for p in params:
            p.grad = None
        return None
    return float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))


def train_step(engine, micro_batches: list[dict], grad_divisor: int, clip: float, poison: bool = False) -> StepResult:
    """Forward/backward every micro-batch, then step.

    Each micro-batch contributes loss_sum * grad_divisor / N, N being the step's targeted tokens over
    all ranks and grad_divisor the number of ranks DeepSpeed averages gradients over, so the update
    follows the token-weighted mean loss whatever the split across micro-batches and ranks.
    A non-finite loss anywhere poisons the step's gradients on every rank (the decision is global,
    so all ranks keep issuing the same collectives); DeepSpeed's overflow check then skips the
    update; with ZeRO-0, which has no such check, the gradients are dropped before the step.
    """
    local_targets = sum(target_count(b) for b in micro_batches)
    local_tokens = sum(b["input_ids"].numel() for b in micro_batches)
    total_targets, total_tokens = _all_reduce([local_targets, local_tokens])
    denom = max(total_targets, 1.0)

    loss_sum, bad, own_norm = 0.0, False, None
    for i, batch in enumerate(micro_batches):
        loss = engine(to_device(batch, engine.device))
        value = float("nan") if poison else float(loss.detach())
        (finite,) = _all_reduce([float(math.isfinite(value))], op=dist.ReduceOp.MIN)
        bad = bad or finite < 1
        if bad:
            loss = loss * float("nan")
        else:
            loss_sum += value
        engine.backward(loss * (grad_divisor / denom), scale_wrt_gas=False)
        if i == len(micro_batches) - 1 and engine.zero_optimization_stage() == 0:
            own_norm = _zero0_boundary(engine, bad, clip)
        engine.step()

    if bad and engine.zero_optimization_stage() > 0 and engine.was_step_applied():
        raise RuntimeError("DeepSpeed applied an update with NaN gradients; enable its overflow check "
                           "(bf16.check_grad_overflow) in the DeepSpeed config")
    (global_loss,) = _all_reduce([loss_sum])
    norm = own_norm if engine.zero_optimization_stage() == 0 else engine.get_global_grad_norm()
    return StepResult(loss=float("nan") if bad else global_loss / denom, target_tokens=int(total_targets),
                      tokens=int(total_tokens), grad_norm=None if bad or norm is None else float(norm), skipped=bad)
