"""benchmarks/decode.py's attention level: `--growing` hands every step one more cached key, as generate does."""

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
