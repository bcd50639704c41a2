"""MoBA routing statistics: the probe against dense reference computations, and a probed model's output."""

import pytest
import torch

from moba_train.models import AttentionPlan, attach_plan, attention_modules, build_from_config
from moba_train.models.hf_compat import enable_activation_checkpointing
from moba_train.ops.moba import build_layout, select_blocks
from moba_train.tracking import distance_bins
from moba_train.tracking.routing_stats import RoutingCollector, probing


def reference(q, k, cu: list[int], block: int, topk: int, scale: float):
    """Distance histogram over all chosen blocks; mean full-attention mass on attended keys over the queries
    whose document has more earlier blocks than topk-1 (every such query, every head), by dense softmax."""
    layout = build_layout(cu, block, q.device)
    selected = select_blocks(q, k, layout, topk)
    T, H, _ = q.shape
    group = H // k.shape[1]
    distances: dict[int, int] = {}
    mass, count = 0.0, 0
    for t in range(T):
        doc = max(i for i in range(len(cu) - 1) if cu[i] <= t)
        start = cu[doc]
        own = int(layout.token_block[t])
        for h in range(H):
            chosen = [int(b) for b in selected[t, h] if b >= 0]
            for b in chosen:
                distances[own - b] = distances.get(own - b, 0) + 1
            if own - int(layout.token_doc_first_block[t]) < topk:
                continue
            probs = ((k[start:t + 1, h // group] @ q[t, h]) * scale).softmax(0)
            key_blocks = layout.token_block[start:t + 1]
            attended = (key_blocks == own) | torch.isin(key_blocks, torch.tensor(chosen))
            mass += float(probs[attended].sum())
            count += 1
    return distances, mass / count


@pytest.mark.parametrize("docs,block,topk", [([128], 16, 3), ([70, 100, 30], 16, 2), ([96, 64], 8, 4)],
                         ids=["one-doc", "three-docs-short-tails", "two-docs-topk4"])
def test_collector_matches_dense_reference(docs, block, topk):
    g = torch.Generator().manual_seed(1)
    cu = [0]
    for n in docs:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], 4, 8, generator=g)
    k = torch.randn(cu[-1], 2, 8, generator=g)
    scale = 8 ** -0.5
    collector = RoutingCollector(num_layers=1, max_blocks=max(docs) // block + 1, max_queries=10_000)
    collector.observe(0, q, k, torch.tensor(cu, dtype=torch.int32), block, topk, scale)
    stats = collector.result()
    distances, mass = reference(q, k, cu, block, topk, scale)
    assert {d: c for d, c in enumerate(stats.distance_counts) if c} == distances
    assert stats.mass_captured == pytest.approx(mass, rel=1e-5)
    assert 0 < stats.mass_captured < 1


def test_probe_leaves_the_output_unchanged_and_reports_each_moba_layer_once():
    cfg = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2)
    model = build_from_config(cfg, seed=0)
    plan = AttentionPlan.from_config({"block_size": 16, "topk": 2, "moba_layers": [0, 2]}, 3)
    attach_plan(model, plan)
    enable_activation_checkpointing(model)
    model.train()
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    plain = model(ids, use_cache=False).logits
    collector = RoutingCollector(num_layers=3, max_blocks=6, max_queries=8)
    with probing(model, plan, collector):
        probed = model(ids, use_cache=False).logits
        probed.sum().backward()                  # checkpointing recomputes each layer's forward
    assert torch.equal(plain, probed)
    stats = collector.result()
    assert sorted(stats.mass_by_layer) == [0, 2]
    assert stats.sampled_queries == 2 * 8
    assert sum(stats.distance_counts) == 2 * 4 * sum(min(1, i) * 16 for i in range(6))   # layers x heads x queries
    assert all(m.moba_train.plan is plan for m in attention_modules(model))        # restored after the block


@pytest.mark.parametrize("farthest", [1, 7, 512, 513, 5000], ids=lambda n: f"farthest{n}")
def test_distance_histogram_fits_wandb_and_keeps_every_count(farthest):
    counts = [0] + [d % 3 + 1 for d in range(1, farthest + 1)]
    hist, edges = distance_bins(counts)
    assert len(hist) <= 512 and len(edges) == len(hist) + 1 and sum(hist) == sum(counts)
    assert edges[0] == 1 and edges[-1] == farthest + 1
    if farthest <= 512:
        assert hist == counts[1:]                                    # one bin per distance
