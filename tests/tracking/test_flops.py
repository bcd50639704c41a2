"""FLOP counting: MoBA's attention work from the document layout, against masks built from the real routing."""

import pytest
import torch

from moba_train.models import AttentionPlan, build_from_config
from moba_train.ops.moba import build_layout, select_blocks
from moba_train.tracking.flops import (AttentionWork, ModelShape, device_peak, full_work, moba_work, step_flops)


def routed_work(doc_lengths: list[int], block_size: int, topk: int, seed: int = 0) -> AttentionWork:
    """Plain reference: the oracle's attention mask (causal and own block or a gate-chosen block) for random
    q/k, pairs counted over every query; gate candidates = earlier blocks of the query's document."""
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    for n in doc_lengths:
        cu.append(cu[-1] + n)
    T, H, D = cu[-1], 2, 8
    q, k = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
    layout = build_layout(cu, block_size, q.device)
    selected = select_blocks(q, k, layout, topk)
    pairs = gate = 0
    for start, end in zip(cu, cu[1:]):
        blocks = layout.token_block[start:end]
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        own = blocks[:, None] == blocks[None, :]
        chosen = (blocks[None, :, None] == selected[start:end, 0, None, :]).any(-1)
        pairs += int((causal & (own | chosen)).sum())
        gate += int((blocks - layout.token_doc_first_block[start:end]).sum())
    return AttentionWork(pairs, gate)


LAYOUTS = {
    "one-doc-whole-blocks": [256],
    "one-doc-short-tail": [250],
    "many-docs": [64, 1, 130, 33, 97],
    "doc-shorter-than-block": [20, 45],
}


@pytest.mark.parametrize("topk", [1, 2, 3, 8], ids=lambda k: f"topk{k}")
@pytest.mark.parametrize("block", [16, 32], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("docs", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_moba_work_counts_the_pairs_the_routed_mask_allows(docs, block, topk):
    assert moba_work(docs, block, topk) == routed_work(docs, block, topk)


@pytest.mark.parametrize("docs", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_full_work_is_the_causal_triangle_and_moba_with_every_block_equals_it(docs):
    assert full_work(docs).pairs == sum(n * (n + 1) // 2 for n in docs)
    assert moba_work(docs, 16, topk=10_000).pairs == full_work(docs).pairs


def test_step_flops_from_a_hand_counted_llama():
    h, inter, layers, heads, kv, vocab = 64, 128, 4, 4, 2, 512
    model = build_from_config(dict(model_type="llama", hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                   tie_word_embeddings=True))
    hd = h // heads
    per_layer = h * h + 2 * h * kv * hd + h * h + 3 * h * inter          # q, k+v, o, gate/up/down
    shape = ModelShape.of(model)
    assert shape.linear_weights == layers * per_layer + h * vocab     # the tied LM head is still a matmul

    docs = [100, 60, 96]
    cu = torch.tensor([0, 100, 160, 256], dtype=torch.int32)
    packs = [{"input_ids": torch.zeros(1, 256, dtype=torch.long), "cu_seqlens": cu}] * 2
    plan = AttentionPlan.from_config({"block_size": 32, "topk": 2, "moba_layers": [0, 1, 2]}, layers)
    moba, full = moba_work(docs, 32, 2), full_work(docs)
    expected = (6 * shape.linear_weights * 512
                + 2 * (12 * h * (3 * moba.pairs + full.pairs) + 2 * h * 3 * moba.gate))
    assert step_flops(shape, packs, plan) == expected


def test_configured_peak_wins_and_cpu_peak_is_measured_and_labelled():
    assert device_peak(312.0, torch.bfloat16, torch.device("cpu")).tflops == 312.0
    measured = device_peak(None, torch.float32, torch.device("cpu"))
    assert measured.tflops > 0 and "measured" in measured.source
