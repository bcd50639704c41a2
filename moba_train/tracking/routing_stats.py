"""MoBA routing statistics, measured inside one sampled training step.

For that step the model's MoBA layers run through a probe (an extra attention mode registered in
moba_train.models.attention.VARLEN_OPS) that computes the layer's ordinary output with the same
operator and, on the side and without gradient, records

  * how far back the gate reaches: a histogram of block distances (own block - chosen block, >= 1) of
    every query's chosen earlier blocks (the own block, distance 0, is always attended);
  * how much of full attention's probability mass the attended blocks capture: for an evenly spaced
    sample of the queries where MoBA is sparse (their document has more earlier blocks than topk-1),
    the softmax of q against the query's whole causal prefix, summed over its own block and chosen blocks.

The probe sees what attention sees: with Ulysses, the whole sequence for this rank's heads; every
rank's counts are summed. Activation checkpointing runs a layer's forward twice; only the first is counted.
No random numbers are drawn, so a sampled step leaves the training RNG streams untouched.
"""

from __future__ import annotations

import math
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moba_train.models.attention import VARLEN_OPS, attention_modules
from moba_train.models.context import attention_context
from moba_train.models.plan import LayerAttention
from moba_train.ops.moba import build_layout, select_blocks

PROBE_MODE = "moba_probe"
SCORE_ELEMENTS = 1 << 24          # fp32 logits alive at once while measuring the captured mass


@dataclass(frozen=True)
class ProbedLayer(LayerAttention):
    """A MoBA layer whose attention also reports to `collector`."""

    layer_idx: int = -1
    collector: "RoutingCollector | None" = field(default=None, compare=False, hash=False, repr=False)

    def plain(self) -> LayerAttention:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LayerAttention)}
        return LayerAttention(**{**fields, "mode": "moba"})

    def describe(self) -> str:
        return self.plain().describe()


class ProbedPlan:
    """Answers like the wrapped plan, except that its MoBA layers are probed."""

    def __init__(self, plan, collector: "RoutingCollector"):
        self.plan, self.collector = plan, collector

    def at(self, layer_idx: int, progress: float | None = None) -> LayerAttention:
        layer = self.plan.at(layer_idx, progress)
        if layer.mode != "moba":
            return layer
        fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(LayerAttention)}
        return ProbedLayer(**{**fields, "mode": PROBE_MODE}, layer_idx=layer_idx, collector=self.collector)

    def __getattr__(self, name):
        return getattr(self.plan, name)


def _probed_moba(q, k, v, cu_seqlens, max_seqlen, layer: ProbedLayer, softmax_scale):
    layer.collector.observe(layer.layer_idx, q, k, cu_seqlens, layer.block_size, layer.topk,
                            softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5, layer.centroids)
    return VARLEN_OPS["moba"](q, k, v, cu_seqlens, max_seqlen, layer.plain(), softmax_scale)


VARLEN_OPS[PROBE_MODE] = _probed_moba


@dataclass
class RoutingStats:
    distance_counts: list[int]          # [d] = how often a block d blocks back was chosen (index 0 unused)
    mass_captured: float | None         # mean over sampled (query, head) pairs where MoBA is sparse
    mass_by_layer: dict[int, float]
    sampled_queries: int                # per layer and rank, summed

    @property
    def mean_distance(self) -> float | None:
        total = sum(self.distance_counts)
        return sum(d * c for d, c in enumerate(self.distance_counts)) / total if total else None


class RoutingCollector:
    def __init__(self, num_layers: int, max_blocks: int, max_queries: int):
        self.num_layers, self.max_blocks, self.max_queries = num_layers, max_blocks, max_queries
        self.seen: set[int] = set()
        self.distances = torch.zeros(max_blocks + 1, dtype=torch.float64)
        self.mass = torch.zeros(num_layers, 2, dtype=torch.float64)       # [layer] = (sum, count)
        self.queries = 0

    @torch.no_grad()
    def observe(self, layer_idx: int, q, k, cu_seqlens, block_size: int, topk: int, scale: float,
                centroids: str = "reference") -> None:
        if layer_idx in self.seen:          # the recompute of a checkpointed layer
            return
        self.seen.add(layer_idx)
        layout = build_layout(cu_seqlens.tolist(), block_size, q.device)
        selected = select_blocks(q, k, layout, topk, centroids)            # [T, Hq, topk-1], -1 = none
        own = layout.token_block
        chosen = selected >= 0
        distance = (own[:, None, None] - selected)[chosen]
        counts = torch.bincount(distance.clamp(max=self.max_blocks).cpu(), minlength=self.max_blocks + 1)
        self.distances += counts[: self.max_blocks + 1].double()
        block_in_doc = own - layout.token_doc_first_block
        sparse = (block_in_doc >= topk).nonzero().squeeze(1)
        if sparse.numel():
            take = min(self.max_queries, sparse.numel())
            picks = sparse[torch.linspace(0, sparse.numel() - 1, take, device=q.device).round().long()]
            total, n = _captured_mass(q, k, layout, selected, picks, scale)
            self.mass[layer_idx] += torch.tensor([total, n], dtype=torch.float64)
            self.queries += take

    def result(self) -> RoutingStats:
        """Sum over ranks (a collective: every rank calls it)."""
        flat = torch.cat([self.distances, self.mass.reshape(-1), torch.tensor([float(self.queries)],
                                                                                dtype=torch.float64)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = flat.cuda() if dist.get_backend() == "nccl" else flat
            dist.all_reduce(flat)
            flat = flat.cpu()
        nd = self.max_blocks + 1
        distances = flat[:nd]
        mass = flat[nd:nd + 2 * self.num_layers].view(self.num_layers, 2)
        sums, counts = mass[:, 0], mass[:, 1]
        by_layer = {i: float(sums[i] / counts[i]) for i in range(self.num_layers) if counts[i] > 0}
        captured = float(sums.sum() / counts.sum()) if counts.sum() > 0 else None
        return RoutingStats([int(c) for c in distances.tolist()], captured, by_layer, int(flat[-1]))


def _captured_mass(q, k, layout, selected, picks, scale: float) -> tuple[float, int]:
    """Sum over (pick, head) of the full-attention probability on the attended blocks, and the pair count."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    total, count = 0.0, 0
    first_block = layout.token_doc_first_block[picks]
    doc_of = first_block.tolist()
    starts = layout.block_start[first_block].tolist()               # each pick's document's first token
    picks_list = picks.tolist()
    i = 0
    while i < len(picks_list):
        start, doc = starts[i], doc_of[i]
        j = i + 1          # queries of one document, as many as fit the logits budget
        while j < len(picks_list) and doc_of[j] == doc and (j - i + 1) * Hq * (picks_list[j] - start + 1) <= SCORE_ELEMENTS:
            j += 1
        ts = picks[i:j]
        end = picks_list[j - 1] + 1
        keys = k[start:end].float().repeat_interleave(group, dim=1)                  # [n, Hq, D]
        logits = torch.einsum("qhd,nhd->qhn", q[ts].float(), keys) * scale            # [c, Hq, n]
        causal = torch.arange(start, end, device=q.device)[None, :] <= ts[:, None]    # [c, n]
        probs = logits.masked_fill(~causal[:, None, :], float("-inf")).softmax(dim=-1)
        # attended blocks of each (query, head) as a mask over the document's blocks (spare last slot: none)
        key_block = layout.token_block[start:end] - doc                              # [n], within the document
        n_blocks = int(key_block[-1]) + 1
        blocks = torch.zeros(ts.numel(), Hq, n_blocks + 1, dtype=torch.bool, device=q.device)
        chosen = selected[ts]
        blocks.scatter_(-1, torch.where(chosen >= 0, chosen - doc, n_blocks), True)
        blocks[torch.arange(ts.numel(), device=q.device), :, layout.token_block[ts] - doc] = True
        attended = blocks.gather(-1, key_block.expand(ts.numel(), Hq, -1))
        total += float((probs * attended).sum())
        count += ts.numel() * Hq
        i = j
    return total, count


@contextmanager
def probing(model: torch.nn.Module, plan, collector: RoutingCollector):
    """Route `model`'s MoBA layers through the probe for the duration of the block."""
    modules = attention_modules(model)
    contexts = [attention_context(m) for m in modules]
    previous = [c.plan for c in contexts]
    probe = ProbedPlan(plan, collector)
    for c in contexts:
        c.plan = probe
    try:
        yield collector
    finally:
        for c, p in zip(contexts, previous):
            c.plan = p


def has_moba_layers(plan) -> bool:
    return any(plan.at(i).mode == "moba" for i in range(plan.num_layers))


def max_blocks(seq_len: int, block_size: int) -> int:
    return math.ceil(seq_len / block_size)
