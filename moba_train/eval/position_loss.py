"""Validation loss by position in the document, and the trailing-token loss the MoBA paper reports.

Long-context gains show up late in a document: a model that uses distant context has lower loss
at position 30K than at 300. Positions are `position_ids` (restarting per document), bucketed
evenly up to the stage length; the tail is the last min(tail_tokens, L/4) positions (2048 by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moba_train.job.lm import to_device


@dataclass
class PositionLoss:
    seq_len: int
    mean_loss: float
    tail_loss: float | None
    tail_window: int
    bucket_edges: list[int] = field(default_factory=list)    # bucket b covers positions [edges[b], edges[b+1])
    bucket_loss: list[float | None] = field(default_factory=list)
    tokens: int = 0


def tail_window(seq_len: int, tail_tokens: int = 2048) -> int:
    return min(tail_tokens, max(1, seq_len // 4))


@torch.no_grad()
def evaluate_position_loss(module, batches, seq_len: int, buckets: int = 16, chunk_tokens: int = 4096,
                           tail_tokens: int = 2048) -> PositionLoss:
    """`module` is the trained PackedCausalLM (engine.module); every rank must call this together."""
    buckets = max(1, min(buckets, seq_len))
    edges = [seq_len * b // buckets for b in range(buckets + 1)]
    window = tail_window(seq_len, tail_tokens)
    sums = torch.zeros(buckets + 1, dtype=torch.float64)     # last slot: the tail
    counts = torch.zeros(buckets + 1, dtype=torch.float64)
    was_training = module.training
    module.eval()
    head = module.lm.get_output_embeddings()
    device = next(module.parameters()).device
    for batch in batches:
        batch = to_device(batch, device)
        hidden = module.hidden_states(batch).reshape(-1, module.lm.config.hidden_size)
        labels = batch["shift_labels"].reshape(-1)
        pos = batch["position_ids"].reshape(-1)
        for s in range(0, labels.numel(), chunk_tokens):
            y = labels[s:s + chunk_tokens]
            nll = F.cross_entropy(head(hidden[s:s + chunk_tokens]).float(), y, ignore_index=-100, reduction="none")
            keep = y != -100
            p = pos[s:s + chunk_tokens][keep].clamp(max=seq_len - 1)
            b = torch.bucketize(p, torch.tensor(edges[1:-1], device=p.device), right=True)
            sums.index_add_(0, b.cpu(), nll[keep].double().cpu())
            counts.index_add_(0, b.cpu(), torch.ones_like(b, dtype=torch.float64).cpu())
            tail = p >= seq_len - window
            sums[-1] += nll[keep][tail].double().sum().cpu()
            counts[-1] += tail.sum().cpu()
    module.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.stack([sums, counts])
        if dist.get_backend() == "nccl":
            both = both.cuda()
        dist.all_reduce(both)
        sums, counts = both[0].cpu(), both[1].cpu()
    per_bucket = [float(s / c) if c else None for s, c in zip(sums[:-1], counts[:-1])]
    total = float(counts[:-1].sum())
    return PositionLoss(seq_len=seq_len, mean_loss=float(sums[:-1].sum() / total) if total else float("nan"),
                        tail_loss=float(sums[-1] / counts[-1]) if counts[-1] else None, tail_window=window,
                        bucket_edges=edges, bucket_loss=per_bucket, tokens=int(total))
