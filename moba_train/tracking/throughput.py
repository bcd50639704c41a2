"""Per-step speed and resources: tokens/s, achieved TFLOP/s and MFU, data wait, peak memory."""

from __future__ import annotations

import dataclasses
import resource
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .flops import ModelShape, Peak, attention_flops, device_peak, matmul_flops, measured_matmul_tflops


@dataclass(frozen=True)
class StepTiming:
    seconds: float              # the whole step: waiting for data, forward, backward, optimizer
    data_seconds: float         # waiting for the step's micro-batches


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """This process's peak: CUDA's max allocated since the stage began, or the peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "max_rss"   # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _sum_over_ranks(value: float) -> float:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


class Throughput:
    def __init__(self, model: torch.nn.Module, world: int, configured_peak: float | None, measure_peak: bool):
        self.shape = ModelShape.of(model)
        self.world = world
        param = next(model.parameters())
        self.device = param.device
        # Only the rank that logs needs the peak; measuring it costs a few matmuls.
        self.dtype = param.dtype
        self.peak: Peak | None = device_peak(configured_peak, param.dtype, self.device) if measure_peak else None

    def refresh_peak(self) -> None:
        """A measured peak (CPUs) is only as good as the moment it was taken: on a shared machine a busy
        moment gives a low rate, and MFU above 100% later. Measure again and keep the best."""
        if self.peak is not None and self.peak.measured:
            rate = measured_matmul_tflops(self.dtype, self.device)
            if rate > self.peak.tflops:
                self.peak = dataclasses.replace(self.peak, tflops=rate)

    def measure(self, packs: list[dict], plan, sp: int, tokens: int, timing: StepTiming) -> dict:
        """Every rank calls this (the step's FLOPs are summed over ranks). `packs` are this rank's whole
        packs before the sequence-parallel split; `sp` ranks share each, so the sum is divided by sp."""
        attention = _sum_over_ranks(attention_flops(self.shape, packs, plan)) / sp
        flops = matmul_flops(self.shape, tokens) + attention
        seconds = max(timing.seconds, 1e-9)
        tokens_per_s = tokens / seconds
        achieved = flops / seconds / 1e12
        memory, memory_kind = peak_memory_gib(self.device)
        out = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / self.world,
            "flops": flops,
            "attention_flops": attention,
            "tflops_per_s": achieved,
            "tflops_per_s_per_gpu": achieved / self.world,
            "data_wait_share": timing.data_seconds / seconds,
            "step_seconds": timing.seconds,
            "peak_memory_gib": memory,
            "peak_memory_kind": memory_kind,
        }
        if self.peak is not None:
            out["peak_tflops"] = self.peak.tflops
            out["mfu"] = achieved / (self.peak.tflops * self.world)
        return out
