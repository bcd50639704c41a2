"""Validation loss by position and the trailing-token loss against a per-token reference."""

import pytest
import torch
import torch.nn.functional as F

from moba_train.eval.position_loss import evaluate_position_loss, tail_window
from moba_train.models import AttentionPlan, attach_plan, build_from_config
from moba_train.job.lm import PackedCausalLM, model_kwargs


def packed(docs: list[int], vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(docs),), generator=g)
    pos = torch.cat([torch.arange(n) for n in docs])
    labels = ids.roll(-1).clone()
    ends = torch.tensor(docs).cumsum(0) - 1
    labels[ends] = -100                                   # a document's last token has no target
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids[None], "position_ids": pos[None], "shift_labels": labels[None], "cu_seqlens": cu,
            "max_seqlen": max(docs)}


@pytest.mark.parametrize("buckets,tail_tokens", [(4, 2048), (7, 16)], ids=["4-buckets", "7-buckets-tail16"])
def test_buckets_and_tail_match_per_token_losses(buckets, tail_tokens):
    L, vocab = 128, 96
    model = build_from_config(dict(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
    attach_plan(model, AttentionPlan.from_config({"block_size": 16, "topk": 2, "moba_layers": "all"}, 2))
    module = PackedCausalLM(model, loss_chunk_tokens=50)
    batches = [packed([128], vocab, 0), packed([40, 88], vocab, 1)]
    got = evaluate_position_loss(module, batches, L, buckets=buckets, chunk_tokens=50, tail_tokens=tail_tokens)

    sums, counts = [0.0] * buckets, [0] * buckets
    tail_sum, tail_n = 0.0, 0
    window = tail_window(L, tail_tokens)
    with torch.no_grad():
        for b in batches:
            logits = model(**model_kwargs(b)).logits[0]
            nll = F.cross_entropy(logits.float(), b["shift_labels"][0], ignore_index=-100, reduction="none")
            for p, y, v in zip(b["position_ids"][0].tolist(), b["shift_labels"][0].tolist(), nll.tolist()):
                if y == -100:
                    continue
                k = next(i for i in range(buckets) if p < L * (i + 1) // buckets)
                sums[k] += v
                counts[k] += 1
                if p >= L - window:
                    tail_sum, tail_n = tail_sum + v, tail_n + 1
    assert got.tokens == sum(counts) == 2 * L - 3
    assert got.bucket_loss == pytest.approx([s / c if c else None for s, c in zip(sums, counts)], rel=1e-5)
    assert got.mean_loss == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert got.tail_window == window and got.tail_loss == pytest.approx(tail_sum / tail_n, rel=1e-5)
