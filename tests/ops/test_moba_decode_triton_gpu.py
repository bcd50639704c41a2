"""The fused MoBA decode kernel (ops/moba/decode_triton.py) on a CUDA GPU, against the PyTorch decode path (itself
checked against the operator over the whole sequence in tests/models/test_decode.py): every interpreter case in
bf16 and fp16, the Llama-3-8B head shape over a long cache, and greedy generation of every supported family."""

from __future__ import annotations

import pytest
import torch

from moba_train.models import AttentionPlan, MobaKVCache, Sampling
from moba_train.models.cached_attention import decode_backend
from moba_train.models.hf_compat import model_cache_keyword
from tests.models.test_decode import greedy_by_recomputing
from tests.models.tiny import FAMILIES, stock_model, with_plan
from moba_train.models.graph_decode import greedy_decode, sample_decode
from tests.ops.test_moba_decode_triton_interpreter import (CASES, DEVICE_CASES, GREEDY_CASES, LAYOUTS, _decode_both,
                                                           _decode_on_the_device, greedy_by_generate)

pytestmark = pytest.mark.gpu

# bf16 keeps 8 bits of mantissa: the kernel's tensor-core products and the torch path's SDPA round differently.
DTYPES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, dict(atol=2e-2, rtol=2e-2)),
          "fp16": (torch.float16, dict(atol=3e-3, rtol=3e-3))}
LONG = {   # (query heads, KV heads, head_dim, block_size, topk, prompt lengths)
    "llama3-8b-heads-bs512-top3-padded": (32, 8, 128, 512, 3, (20000, 19211)),
    "smollm2-heads-bs512-top3": (9, 3, 64, 512, 3, (33000,)),
    "gqa7-d96-bs256-top4": (7, 1, 96, 256, 4, (9000, 4321, 8888)),
    "d256-bs128-top8": (4, 2, 256, 128, 8, (5000,)),
    # 1,093 candidate blocks: 69 gate programs per (row, KV head) and a [4, 2048] top-k tile in each split
    "gqa4-d128-bs64-top4-1093-candidates": (8, 2, 128, 64, 4, (70000,)),
}


@pytest.mark.parametrize("dtype,tol", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_step_equals_the_pytorch_decode_path_on_cuda(case, dtype, tol):
    _decode_both(*case, dtype, LAYOUTS["contiguous"], device="cuda", tol=tol)


@pytest.mark.parametrize("dtype,tol", [DTYPES["bf16"]], ids=["bf16"])
@pytest.mark.parametrize("case", LONG.values(), ids=LONG.keys())
def test_long_caches_and_real_head_shapes_on_cuda(case, dtype, tol):
    _decode_both(*case, dtype, LAYOUTS["view-of-a-longer-buffer"], steps=3, device="cuda", tol=tol)


DEVICE_LONG = {   # as DEVICE_CASES: (query heads, KV heads, head_dim, block_size, topk, prompt lengths, steps)
    **DEVICE_CASES,
    "llama3-8b-heads-bs64-top3-padded-two-block-ends": (32, 8, 128, 64, 3, (3000, 2950), 140),
}


@pytest.mark.parametrize("capture", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("case", DEVICE_LONG.values(), ids=DEVICE_LONG.keys())
def test_decoding_with_the_length_on_the_device_on_cuda(case, capture):
    """The capturable step, run eagerly and as one CUDA graph replayed per token, against the torch path; its
    block means against BlockMeans' (fp32 sums in another order on the GPU: one bf16 rounding step apart)."""
    *shape, steps = case
    _decode_on_the_device(*shape, torch.bfloat16, steps=steps, device="cuda", tol=DTYPES["bf16"][1],
                          capture=capture, means_tol=dict(atol=1e-6, rtol=1e-2))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_with_the_kernel_equals_recomputing_on_cuda(family):
    model = with_plan(stock_model(family), {"block_size": 4, "topk": 2, "moba_layers": "all",
                                            "decode_backend": "triton"}).cuda()
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=14, do_sample=False,
                             **{model_cache_keyword(model): MobaKVCache.for_model(model, 24)})
    want, _ = greedy_by_recomputing(model, prompt, 14)
    assert torch.equal(out, want)


def test_left_padded_batch_generates_each_row_as_alone_on_cuda():
    """Batch > 1 with left padding: each row's greedy tokens equal that row generated alone, without padding."""
    model = with_plan(stock_model("llama"), {"block_size": 4, "topk": 2, "moba_layers": "all",
                                             "decode_backend": "triton"}).cuda()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 256, (n,), generator=g) for n in (13, 6, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts]).cuda()
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long().cuda()
    kw = model_cache_keyword(model)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 **{kw: MobaKVCache.for_model(model, width + 12)})
        for row, p in enumerate(prompts):
            alone = model.generate(p[None].cuda(), max_new_tokens=12, do_sample=False,
                                   **{kw: MobaKVCache.for_model(model, len(p) + 12)})
            assert torch.equal(batched[row, width:], alone[0, len(p):]), f"row {row}"


def test_auto_decodes_with_the_kernel_on_cuda():
    layer = AttentionPlan.from_config({"block_size": 4, "topk": 2, "moba_layers": "all"}, 1).at(0)
    assert layer.decode_backend == "auto" and decode_backend(layer, torch.device("cuda")) == "triton"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", GREEDY_CASES.values(), ids=GREEDY_CASES.keys())
def test_greedy_decode_in_a_cuda_graph_equals_generate_on_cuda(case, family):
    """One captured model step replayed per token (lengths and block means on the device) against generate()
    with MobaKVCache, eager: the same tokens, fp32."""
    plan, prompts = case
    model = with_plan(stock_model(family), plan).cuda()
    ids, mask, want = greedy_by_generate(model, prompts, 30, device="cuda")
    got = greedy_decode(model, ids, 30, attention_mask=mask)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", GREEDY_CASES.values(), ids=GREEDY_CASES.keys())
def test_sampled_decoding_in_a_cuda_graph_on_cuda(case):
    """Draws inside the replayed graph: top-1 is greedy; a seed gives the same tokens again, another seed others;
    every drawn token is among the top 8 that the model gives it over the whole sequence (fp32)."""
    plan, prompts = case
    model = with_plan(stock_model("llama"), plan).cuda()
    ids, mask, greedy = greedy_by_generate(model, prompts, 30, device="cuda")
    assert torch.equal(sample_decode(model, ids, 30, Sampling(temperature=1.5, top_k=1), attention_mask=mask), greedy)
    sampling = Sampling(temperature=0.9, top_k=8)
    drawn = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        drawn.append(sample_decode(model, ids, 30, sampling, attention_mask=mask))
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
    P = ids.shape[1]
    full_mask = torch.ones_like(drawn[0]) if mask is None else torch.cat([mask, torch.ones_like(mask[:, :1]).expand(
        -1, 30)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=drawn[0], attention_mask=full_mask if mask is not None else None,
                       position_ids=positions).logits[:, P - 1:-1].float()                  # predicting each new token
    chosen = logits.gather(-1, drawn[0][:, P:, None])[..., 0]
    eighth = logits.topk(8, dim=-1).values[..., -1]
    assert (chosen >= eighth - 1e-3).all()


def test_decoding_in_a_cuda_graph_stops_at_eos_as_generate_does_on_cuda():
    """Replays between the EOS checks run past the last row's EOS: their tokens are cut, as generate() stops."""
    from tests.models.test_graph_decode import _eos_ids_that_occur

    plan, prompts = GREEDY_CASES["last-layer-full-padded"]
    model = with_plan(stock_model("llama"), plan).cuda()
    ids, mask, free = greedy_by_generate(model, prompts, 40, device="cuda")
    eos = _eos_ids_that_occur(free[:, ids.shape[1]:], (5, 11, 20))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, **{model_cache_keyword(model): MobaKVCache.for_model(model, ids.shape[1] + 40)})
    got = greedy_decode(model, ids, 40, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert got.shape == want.shape and torch.equal(got, want) and want.shape[1] < ids.shape[1] + 40
