"""Sparse MoBA decoding on a CUDA device (bf16 and fp32) against the operator over the whole sequence."""

from __future__ import annotations

import pytest
import torch

from moba_train.models import LayerAttention, MobaKVCache
from moba_train.models.cached_attention import attend_cached
from moba_train.models.decode_cache import BlockMeans
from moba_train.models.hf_compat import model_cache_keyword
from moba_train.ops import moba_attn_varlen
from tests.models.test_decode import MOBA, greedy_by_recomputing
from tests.models.tiny import stock_model, with_plan

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": (torch.float32, dict(atol=1e-5, rtol=1e-5)), "bf16": (torch.bfloat16, dict(atol=2e-2, rtol=2e-2))}


@pytest.mark.parametrize("dtype,tol", DTYPES.values(), ids=DTYPES.keys())
def test_each_decoded_token_equals_the_operator_on_cuda(dtype, tol):
    bs, topk, T, prefill, (hq, hkv), D = 16, 3, 300, 100, (8, 2), 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, hq, D, device="cuda", generator=g, dtype=dtype)
    k, v = (torch.randn(T, hkv, D, device="cuda", generator=g, dtype=dtype) for _ in range(2))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    want = moba_attn_varlen(q, k, v, cu, T, block_size=bs, topk=topk, backend="naive")
    layer = LayerAttention("moba", bs, topk, "auto")
    means = BlockMeans(bs)
    keys, values = k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous()
    for t in range(prefill, T):
        got = attend_cached(q[t][None, :, None], keys[:, :, :t + 1], values[:, :, :t + 1], None, layer, None, means)
        torch.testing.assert_close(got[0, 0], want[t], **tol)
    assert means.complete == [T // bs]


@pytest.mark.parametrize("cache", ["dynamic", "moba"])
def test_greedy_generate_equals_recomputing_on_cuda(cache):
    model = with_plan(stock_model("llama"), {**MOBA, "backend": "lean"}).cuda()
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4)).cuda()
    kwargs = {model_cache_keyword(model): MobaKVCache.for_model(model, 24)} if cache == "moba" else {}
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=14, do_sample=False, **kwargs)
    want, _ = greedy_by_recomputing(model, prompt, 14)
    assert torch.equal(out, want)
