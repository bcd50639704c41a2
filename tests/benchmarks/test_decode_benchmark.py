"""benchmarks/decode.py: the attention level (`--growing` hands every step one more cached key, as generate does) and
the model level's prefill (`--prefill-rows`)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def decode_benchmark():
    spec = importlib.util.spec_from_file_location("decode_benchmark", ROOT / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("growing", [True, False], ids=["growing", "one-length"])
@pytest.mark.parametrize("mode", ["full", "moba"])
def test_each_step_sees_the_cache_length_the_option_says(decode_benchmark, monkeypatch, mode, growing):
    seen = []
    attend = decode_benchmark.attend_cached

    def spy(query, key, *rest):
        seen.append(key.shape[2])
        return attend(query, key, *rest)

    monkeypatch.setattr(decode_benchmark, "attend_cached", spy)
    args = types.SimpleNamespace(device="cpu", dtype="fp32", heads=[4, 2], head_dim=16, batch=2, block_size=64,
                                 topk=2, warmup=1, steps=3, growing=growing)
    row = decode_benchmark.bench_attention(256, mode, args)
    # the build call, the warm-up, the timed steps and the pipelined steps
    assert len(seen) == 1 + args.warmup + 2 * args.steps
    assert seen == (list(range(256, 256 + len(seen))) if growing else [256] * len(seen))
    assert row["ms_per_step"] > 0 and row["graph_ms"] is None


@pytest.mark.parametrize("cache_class", ["moba", "dynamic"])
def test_a_prefill_row_by_row_gives_the_joint_prefills_logits_and_cache(decode_benchmark, cache_class):
    import torch

    from moba_train.models import attach_plan, build_from_config
    from moba_train.models.hf_compat import model_cache_keyword

    args = types.SimpleNamespace(block_size=16, topk=2)
    cfg = {**decode_benchmark.MODELS["tiny"], "max_position_embeddings": 128}
    model = build_from_config(cfg, dtype=torch.float32, seed=0).eval()
    attach_plan(model, decode_benchmark.plan_for(model, "moba", args))
    ids = torch.randint(0, cfg["vocab_size"], (3, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        joint = decode_benchmark.prefill_cache(model, ids, cache_class, 80, model_cache_keyword(model), by_rows=False)
        rows = decode_benchmark.prefill_cache(model, ids, cache_class, 80, model_cache_keyword(model), by_rows=True)
    torch.testing.assert_close(rows[0], joint[0], atol=1e-4, rtol=1e-4)
    assert rows[0].shape == (3, cfg["vocab_size"])
    assert len(rows[1].layers) == len(joint[1].layers) == cfg["num_hidden_layers"]
    for mine, theirs in zip(rows[1].layers, joint[1].layers):
        assert mine.keys.shape == theirs.keys.shape == (3, cfg["num_key_value_heads"], 70, 32)
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-4, rtol=1e-4)
    assert type(rows[1]) is type(joint[1])


def test_the_model_level_decodes_after_a_prefill_row_by_row(decode_benchmark):
    args = types.SimpleNamespace(device="cpu", dtype="fp32", model="tiny", block_size=16, topk=2, batch=2, warmup=1,
                                 steps=2, caches=["moba"], modes=["full", "moba"], prefill_rows=True)
    rows = decode_benchmark.bench_model(64, args)
    assert [r["decode"] for r in rows] == ["full", "moba"] and all(r["ms_per_step"] > 0 for r in rows)
