"""The fused MoBA decode kernel (ops/moba/decode_triton.py) under Triton's CPU interpreter, against the PyTorch
decode path (itself checked against the operator over the whole sequence in tests/models/test_decode.py).

As for the training kernels, the cases run in a fresh `TRITON_INTERPRET=1` process started by the launcher.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from moba_train.models import LayerAttention, MobaKVCache, Sampling
from moba_train.models.block_means import BlockMeans
from moba_train.models.cached_attention import attend_cached
from moba_train.models.device_decode import DeviceDecodeLayer
from moba_train.models.graph_decode import greedy_decode, sample_decode
from moba_train.models.hf_compat import model_cache_keyword
from tests.models.test_decode import greedy_by_recomputing
from tests.models.tiny import stock_model, with_plan

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed: pip install 'moba-train[triton]'")
in_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs inside the launcher's TRITON_INTERPRET=1 process")

# (query heads, KV heads, head_dim, block_size, topk, prompt lengths of the rows (left-padded to the longest)).
# The interpreter runs each program in Python: a few steps per case, each crossing a block end in some row.
CASES = {
    "mha-d16-bs16-top2": (2, 2, 16, 16, 2, (45,)),
    "gqa3-d64-bs16-top3-padded": (6, 2, 64, 16, 3, (45, 20, 29)),
    "gqa4-d80-bs24-top3": (8, 2, 80, 24, 3, (69, 46)),
    "gqa7-d32-bs16-top1": (7, 1, 32, 16, 1, (45,)),
    "gqa7-d32-bs16-top3-padded": (7, 1, 32, 16, 3, (45, 38)),
    # blocks of 160 keys: two splits per block (the kernel's CHUNK is 128), the own block's second split empty
    "gqa4-d128-bs160-top3-two-splits": (8, 2, 128, 160, 3, (490, 333)),
    # a group of 8 heads with 2 picks each over 18 candidates: 17 splits, more than the merge takes at once
    "gqa8-d16-bs16-top3-17-splits": (8, 1, 16, 16, 3, (300,)),
    # 18 candidate blocks for a gate that scores 16 per program (D 128, 4 heads a group): two gate programs
    "gqa4-d128-bs16-top3-two-gate-programs": (8, 2, 128, 16, 3, (300, 270)),
    "top-all-bs16": (4, 2, 16, 16, 100, (45, 31)),
}
LAYOUTS = {
    "contiguous": lambda x: x.contiguous(),
    "view-of-a-longer-buffer": lambda x: torch.cat([x, torch.full_like(x, float("nan"))], dim=2)[:, :, :x.shape[2]],
    "token-major": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
}


@needs_triton
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="launcher: CPU only, outside the interpreter")
def test_interpreted_decode_kernel_passes_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=540)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    # the parametrized tests and the single ones (+ 1 each; + 2: sampling, and the EOS stop)
    expected = len(CASES) + len(LAYOUTS) - 1 + len(FP16_CASES) + 1 + len(DEVICE_CASES) + 1 + len(GREEDY_CASES) + 2
    assert res.returncode == 0 and f"{expected} passed, 1 skipped" in summary, res.stdout[-6000:] + res.stderr[-2000:]


def _decode_both(hq, hkv, d, bs, topk, prompts, dtype, layout, steps=5, seed=0, device="cpu", tol=None):
    """Decode `steps` tokens per row with the torch path and the kernel; compare every step's output."""
    g = torch.Generator().manual_seed(seed)
    B, K0 = len(prompts), max(prompts)
    K = K0 + steps
    q = torch.randn(B, hq, K, d, generator=g).to(device, dtype)
    k = layout(torch.randn(B, hkv, K, d, generator=g).to(device, dtype))
    v = layout(torch.randn(B, hkv, K, d, generator=g).to(device, dtype))
    valid = torch.zeros(B, K, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        valid[b, K0 - p:] = True
    torch_layer = LayerAttention("moba", bs, topk, "auto", decode_backend="torch")
    kernel_layer = LayerAttention("moba", bs, topk, "auto", decode_backend="triton")
    means = {"torch": BlockMeans(bs), "triton": BlockMeans(bs)}
    tol = tol or (dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3))
    for t in range(K0, K):
        args = (q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], valid[:, :t + 1])
        want = attend_cached(*args, torch_layer, None, means["torch"])
        got = attend_cached(*args, kernel_layer, None, means["triton"])
        assert got.dtype == want.dtype == dtype and not got.isnan().any()
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m, step=t: f"step {step}: {m}")


@in_interpreter
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_step_equals_the_pytorch_decode_path_fp32(case):
    _decode_both(*case, torch.float32, LAYOUTS["contiguous"])


@in_interpreter
@pytest.mark.parametrize("layout", [v for k, v in LAYOUTS.items() if k != "contiguous"],
                         ids=[k for k in LAYOUTS if k != "contiguous"])
def test_the_kernel_reads_the_cache_in_place_whatever_its_strides(layout):
    _decode_both(*CASES["gqa3-d64-bs16-top3-padded"], torch.float32, layout)


FP16_CASES = ["gqa3-d64-bs16-top3-padded", "gqa4-d80-bs24-top3"]


@in_interpreter
@pytest.mark.parametrize("case", [CASES[c] for c in FP16_CASES], ids=FP16_CASES)
def test_each_step_equals_the_pytorch_decode_path_fp16(case):
    _decode_both(*case, torch.float16, LAYOUTS["contiguous"])


@in_interpreter
def test_greedy_generate_with_the_kernel_equals_recomputing():
    model = with_plan(stock_model("llama"), {"block_size": 4, "topk": 2, "moba_layers": "all",
                                             "decode_backend": "triton"})
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=14, do_sample=False,
                             **{model_cache_keyword(model): MobaKVCache.for_model(model, 24)})
    want, _ = greedy_by_recomputing(model, prompt, 14)
    assert torch.equal(out, want)


def _decode_on_the_device(hq, hkv, d, bs, topk, prompts, dtype, steps=5, seed=0, device="cpu", tol=None,
                          capture=False, means_tol=None):
    """Decode `steps` tokens per row with `DeviceDecodeLayer` (lengths and block means on the device; with
    `capture`, one CUDA graph replayed per step) and with the torch path over the growing cache: every step's
    output, and in the end the block means, must agree."""
    g = torch.Generator().manual_seed(seed)
    B, K0 = len(prompts), max(prompts)
    K = K0 + steps
    q = torch.randn(B, hq, K, d, generator=g).to(device, dtype)
    k = torch.randn(B, hkv, K, d, generator=g).to(device, dtype)
    v = torch.randn(B, hkv, K, d, generator=g).to(device, dtype)
    valid = torch.zeros(B, K, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        valid[b, K0 - p:] = True
    layer = DeviceDecodeLayer.from_prefill(k[:, :, :K0], v[:, :, :K0], K + 7, bs, topk, key_valid=valid[:, :K0])
    layer.keys[:, :, K0:] = float("nan")               # slots past the length must never be read
    layer.values[:, :, K0:] = float("nan")
    torch_layer = LayerAttention("moba", bs, topk, "auto", decode_backend="torch")
    means = BlockMeans(bs)
    tol = tol or (dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3))
    inputs = [t[:, :, K0:K0 + 1].clone() for t in (q, k, v)]     # the step's static input buffers

    def step():
        return layer.step(*inputs)

    graph = None
    for t in range(K0, K):
        for buffer, source in zip(inputs, (q, k, v)):
            buffer.copy_(source[:, :, t:t + 1])
        if capture and t > K0:                      # the first step runs eagerly (compiles), then one graph
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    got = step()                    # recorded, not run: the replay below runs it
            graph.replay()
        else:
            got = step()
        want = attend_cached(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], valid[:, :t + 1], torch_layer, None,
                             means)
        assert int(layer.length) == t + 1
        assert got.dtype == want.dtype == dtype and not got.isnan().any()
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m, step=t: f"step {step}: {m}")
    for b, done in enumerate(means.complete):
        assert done > 0
        torch.testing.assert_close(layer.means[b, :, :done], means.means[b, :, :done],
                                   **(means_tol or dict(atol=0, rtol=0)))
        assert not layer.means[b, :, done:].any(), "a block mean was written before its block completed"


# Rows whose block ends fall inside the steps (and some that do not), left padding, GQA.
DEVICE_CASES = {
    "gqa3-d64-bs16-top3-padded": (6, 2, 64, 16, 3, (45, 20, 29), 20),
    "gqa4-d128-bs16-top3-two-gate-programs": (8, 2, 128, 16, 3, (300, 270), 6),
}


@in_interpreter
@pytest.mark.parametrize("case", DEVICE_CASES.values(), ids=DEVICE_CASES.keys())
def test_decoding_with_the_length_on_the_device_equals_the_pytorch_decode_path(case):
    *shape, steps = case
    _decode_on_the_device(*shape, torch.float32, steps=steps)


@in_interpreter
def test_decoding_with_the_length_on_the_device_rounds_fp16_block_means_as_the_operator():
    """fp16 keys: the reference convention rounds each block mean to fp16 (the fp32 cases cannot tell)."""
    *shape, steps = DEVICE_CASES["gqa3-d64-bs16-top3-padded"]
    _decode_on_the_device(*shape, torch.float16, steps=steps)


# (plan, prompt lengths of the rows, left-padded to the longest): MoBA everywhere, and the last layer dense
GREEDY_CASES = {
    "all-moba": ({"block_size": 4, "topk": 2, "moba_layers": "all", "decode_backend": "triton"}, (10,)),
    "last-layer-full-padded": ({"block_size": 4, "topk": 2, "moba_layers": {"all_but_last": 1},
                                "decode_backend": "triton"}, (10, 6, 9)),
}


def padded_prompts(prompts: tuple[int, ...], device="cpu", seed=4):
    """Random prompts of these lengths, left-padded with token 0, and their mask (None for one row)."""
    g = torch.Generator().manual_seed(seed)
    P = max(prompts)
    ids = torch.randint(1, 256, (len(prompts), P), generator=g)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        mask[b, P - p:] = 1
    return (ids * mask).to(device), (mask.to(device) if len(prompts) > 1 else None)


def greedy_by_generate(model, prompts: tuple[int, ...], new: int, device="cpu", seed=4):
    """Left-padded random prompts and generate()'s greedy continuation of them with MobaKVCache."""
    ids, mask = padded_prompts(prompts, device, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              **{model_cache_keyword(model): MobaKVCache.for_model(model, ids.shape[1] + new)})
    return ids, mask, want


@in_interpreter
@pytest.mark.parametrize("case", GREEDY_CASES.values(), ids=GREEDY_CASES.keys())
def test_greedy_decode_with_the_length_on_the_device_equals_generate(case):
    plan, prompts = case
    model = with_plan(stock_model("llama"), plan)
    ids, mask, want = greedy_by_generate(model, prompts, 14)
    got = greedy_decode(model, ids, 14, attention_mask=mask)
    assert torch.equal(got, want)


@in_interpreter
def test_sample_decode_with_the_length_on_the_device_draws_what_generate_draws():
    """Sparse layers on the kernel, both ways; the same seed gives the same draws."""
    plan, _ = GREEDY_CASES["last-layer-full-padded"]
    model = with_plan(stock_model("llama"), plan)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids, mask = padded_prompts((10, 6))
    torch.manual_seed(3)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=30,
                              top_p=0.9, **{model_cache_keyword(model): MobaKVCache.for_model(model, ids.shape[1] + 10)})
    torch.manual_seed(3)
    got = sample_decode(model, ids, 10, Sampling(temperature=0.8, top_k=30, top_p=0.9), attention_mask=mask)
    assert torch.equal(got, want)


@in_interpreter
def test_greedy_decode_with_the_length_on_the_device_stops_at_eos_as_generate_does():
    from tests.models.test_graph_decode import _eos_ids_that_occur

    plan, _ = GREEDY_CASES["last-layer-full-padded"]
    model = with_plan(stock_model("llama"), plan)
    ids, mask, free = greedy_by_generate(model, (10, 6), 10)
    eos = _eos_ids_that_occur(free[:, ids.shape[1]:], (3, 5))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, **{model_cache_keyword(model): MobaKVCache.for_model(model, ids.shape[1] + 10)})
    got = greedy_decode(model, ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want) and want.shape[1] < ids.shape[1] + 10
