"""FLOPs a training step really does, and the MFU they give against the accelerator's peak.

Matmuls: 6 x (weights of every nn.Linear, the LM head included) per token (forward 2, backward 4).
Embedding lookups cost no matmul. Activation-checkpointing recompute is *not* counted (MFU, not HFU).

Attention is counted per layer in the mode the plan gives it, from the documents of each pack:
  full  every query attends the causal prefix of its document: n(n+1)/2 (query, key) pairs;
  moba  a query in block i of its document attends its own block causally plus min(topk-1, i) earlier
        blocks, all of them full (only a document's last block can be short), so the pair count is
        exact without knowing *which* blocks the gate chose; the gate itself scores a query against
        the i earlier blocks' mean keys (forward only: it carries no gradient).
Each (query, key) pair costs 4*Hq*D forward (QK^T and PV) and twice that backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

TRAIN_PASSES = 3            # forward + backward (2x forward)
PAIR_FLOPS_FORWARD = 4      # per head dim: 2 for q.k, 2 for p.v
GATE_FLOPS_FORWARD = 2      # per head dim: q . mean(K_block)


@dataclass(frozen=True)
class AttentionWork:
    """(query, key) pairs attended and (query, block) gate scores, summed over documents."""

    pairs: int = 0
    gate: int = 0

    def __add__(self, other: "AttentionWork") -> "AttentionWork":
        return AttentionWork(self.pairs + other.pairs, self.gate + other.gate)


def full_work(doc_lengths: list[int]) -> AttentionWork:
    return AttentionWork(pairs=sum(n * (n + 1) // 2 for n in doc_lengths))


def moba_work(doc_lengths: list[int], block_size: int, topk: int) -> AttentionWork:
    b, extra = block_size, topk - 1
    pairs = gate = 0
    for n in doc_lengths:
        full_blocks, rest = divmod(n, b)
        pairs += full_blocks * b * (b + 1) // 2 + rest * (rest + 1) // 2          # own block, causal
        # sum over full blocks i < full_blocks of min(extra, i) selected blocks of b keys, each for b queries
        j = min(full_blocks, extra)
        chosen_blocks = j * (j - 1) // 2 + extra * max(0, full_blocks - extra)
        pairs += b * b * chosen_blocks + rest * b * min(extra, full_blocks)
        gate += b * full_blocks * (full_blocks - 1) // 2 + rest * full_blocks
    return AttentionWork(pairs, gate)


def doc_lengths(pack: dict) -> list[int]:
    cu = pack["cu_seqlens"].tolist()
    return [b - a for a, b in zip(cu, cu[1:])]


@dataclass(frozen=True)
class ModelShape:
    linear_weights: int         # every nn.Linear weight element (in x out), the LM head included
    layers: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        # in/out features are module attributes, so this also holds when ZeRO-3 has partitioned the weights
        linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
        return cls(linear, cfg.num_hidden_layers, heads, head_dim)


def matmul_flops(shape: ModelShape, tokens: int) -> float:
    return TRAIN_PASSES * 2 * shape.linear_weights * tokens


def attention_flops(shape: ModelShape, packs: list[dict], plan) -> float:
    """Attention FLOPs of one training step over `packs` with `plan` at its current progress."""
    lengths = [n for p in packs for n in doc_lengths(p)]
    per_mode: dict[tuple, AttentionWork] = {}
    work = AttentionWork()
    for i in range(shape.layers):
        layer = plan.at(i)
        key = (layer.mode, layer.block_size, layer.topk)
        if key not in per_mode:
            per_mode[key] = (moba_work(lengths, layer.block_size, layer.topk) if layer.mode == "moba"
                             else full_work(lengths))
        work = work + per_mode[key]
    hd = shape.heads * shape.head_dim
    return TRAIN_PASSES * PAIR_FLOPS_FORWARD * hd * work.pairs + GATE_FLOPS_FORWARD * hd * work.gate


def step_flops(shape: ModelShape, packs: list[dict], plan) -> float:
    """FLOPs of one training step over `packs` (whole, unsharded packs) with `plan` at its current progress."""
    tokens = sum(p["input_ids"].numel() for p in packs)
    return matmul_flops(shape, tokens) + attention_flops(shape, packs, plan)


# Dense peak TFLOP/s per device: (bf16/fp16 tensor cores, fp32 without TF32). Matched by substring in
# order, so more specific names come first. Sources: NVIDIA data sheets (dense, no sparsity).
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("GH200", 989.4, 66.9),
    ("H100", 989.4, 66.9),
    ("H200", 989.4, 66.9),
    ("H800", 989.4, 66.9),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("A10G", 70.0, 31.2),
]


@dataclass(frozen=True)
class Peak:
    tflops: float               # per device
    source: str                 # where the number comes from (logged with the run)
    measured: bool = False      # a measured rate: re-measured at stage starts, the best one kept


def measured_matmul_tflops(dtype: torch.dtype, device: torch.device, size: int = 2048, reps: int = 3) -> float:
    """The best rate of a few square matmuls: a practical peak where no data-sheet number applies (CPUs)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(reps + 1):       # the first one warms up
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def device_peak(configured: float | None, dtype: torch.dtype, device: torch.device) -> Peak:
    if configured is not None:
        return Peak(configured, "logger.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, half, single in PEAK_TFLOPS:
            if key in name:
                value = single if dtype == torch.float32 else half
                return Peak(value, f"data sheet of {name} ({'fp32' if dtype == torch.float32 else 'bf16'} dense)")
        what = f"{name} is not in moba_train.tracking.flops.PEAK_TFLOPS"
    else:
        what = f"{device.type} has no data-sheet peak"
    rate = measured_matmul_tflops(dtype, device)
    return Peak(rate, f"best measured {str(dtype).replace('torch.', '')} matmul rate ({what}; set "
                      f"logger.peak_tflops to use a data-sheet number)", measured=True)
