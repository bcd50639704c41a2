"""Decoding over a KV cache: sparse MoBA decode equals the operator on the whole sequence, token by token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moba_train.models.cached_attention as cached_attention
import moba_train.models.block_means as block_means_module
import moba_train.models.mask_facts as mask_facts
from moba_train.models import AttentionPlan, LayerAttention
from moba_train.models.plan import DECODE_BACKENDS, DECODE_MODES
from moba_train.models.cached_attention import attend_cached
from moba_train.models.decode_cache import BlockMeans
from moba_train.models.hf_compat import model_cache_keyword, output_cache
from moba_train.ops import moba_attn_varlen
from moba_train.ops.moba import block_means, build_layout
from tests.models.tiny import FAMILIES, logits, stock_model, with_plan

HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (4, 1)}
TOPK = {"top1": 1, "top3": 3, "top-all": 100}
TOL = dict(atol=2e-6, rtol=1e-5)
D = 16
MOBA = {"block_size": 4, "topk": 2, "moba_layers": "all"}          # 2 of up to ~10 blocks: really sparse


def random_qkv(length: int, heads: tuple[int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    return (torch.randn(length, hq, D, generator=g), torch.randn(length, hkv, D, generator=g),
            torch.randn(length, hkv, D, generator=g))


def operator(q, k, v, lens, block_size, topk):
    """The MoBA operator over whole sequences (one per entry of `lens`), [T, H, D] packed."""
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return moba_attn_varlen(q, k, v, cu, max(lens), block_size=block_size, topk=topk, backend="naive")


def as_cache(x):
    """[T, H, D] -> [1, H, T, D], the layout of transformers' cache and queries."""
    return x.transpose(0, 1)[None]


@pytest.mark.parametrize("topk", TOPK.values(), ids=TOPK.keys())
@pytest.mark.parametrize("prefill", [9, 12], ids=["prefill-mid-block", "prefill-at-block-end"])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_each_decoded_token_equals_the_operator_on_the_whole_sequence(heads, prefill, topk):
    bs, T = 4, 41
    layer = LayerAttention("moba", bs, topk, "auto")
    q, k, v = random_qkv(T, heads)
    want = operator(q, k, v, [T], bs, topk)
    means = BlockMeans(bs)
    for t in range(prefill, T):   # one token a step; 8 blocks complete along the way
        got = attend_cached(as_cache(q[t:t + 1]), as_cache(k[:t + 1]), as_cache(v[:t + 1]), None, layer, None, means)
        torch.testing.assert_close(got[0, 0], want[t], **TOL)
    assert means.complete == [T // bs]
    # the means the decoder kept equal the operator's own, bit for bit
    operator_means = block_means(k, build_layout([0, T], bs, k.device))[:T // bs]
    assert torch.equal(means.means[0, :, :T // bs].transpose(0, 1), operator_means)


@pytest.mark.parametrize("chunks", [(9, 5, 1, 7, 3, 12, 2), (9, 30, 1)], ids=["short-chunks", "one-long-chunk"])
def test_several_tokens_per_step_equal_the_operator(chunks, monkeypatch):
    """Queries appended several at a time (assisted decoding, chunked prefill), cut into gather chunks."""
    monkeypatch.setattr(cached_attention, "GATHER_ELEMENTS", 6 * 3 * 4 * D * 2)   # about 2 queries per chunk
    bs, topk, T = 4, 3, sum(chunks)
    layer = LayerAttention("moba", bs, topk, "auto")
    q, k, v = random_qkv(T, HEADS["gqa"], seed=1)
    want = operator(q, k, v, [T], bs, topk)
    means = BlockMeans(bs)
    end = chunks[0]
    for n in chunks[1:]:
        start, end = end, end + n
        got = attend_cached(as_cache(q[start:end]), as_cache(k[:end]), as_cache(v[:end]), None, layer, None, means)
        torch.testing.assert_close(got[0], want[start:end], **TOL)


def test_left_padded_rows_each_equal_the_operator_on_their_own_sequence():
    bs, topk, steps = 4, 3, 19
    prompts = [5, 13, 9]
    K0 = max(prompts)
    layer = LayerAttention("moba", bs, topk, "auto")
    lens = [p + steps for p in prompts]
    q, k, v = random_qkv(sum(lens), HEADS["gqa"], seed=2)
    want = operator(q, k, v, lens, bs, topk)
    starts = torch.tensor([0, *lens]).cumsum(0).tolist()
    B, K = len(prompts), K0 + steps
    # row b: pad_b slots of garbage (must be ignored), then its own sequence
    cache_q, cache_k, cache_v = (torch.full((B, x.shape[1], K, D), 1e3) for x in (q, k, v))
    valid = torch.zeros(B, K, dtype=torch.bool)
    for b, p in enumerate(prompts):
        pad = K0 - p
        for cache, x in ((cache_q, q), (cache_k, k), (cache_v, v)):
            cache[b, :, pad:] = x[starts[b]:starts[b + 1]].transpose(0, 1)
        valid[b, pad:] = True
    means = BlockMeans(bs)
    for t in range(K0, K):
        got = attend_cached(cache_q[:, :, t:t + 1], cache_k[:, :, :t + 1], cache_v[:, :, :t + 1], valid[:, :t + 1],
                            layer, None, means)
        for b, p in enumerate(prompts):
            torch.testing.assert_close(got[b, 0], want[starts[b] + p + t - K0], **TOL)
    assert means.pad == [K0 - p for p in prompts]
    assert means.complete == [n // bs for n in lens]


def test_right_padding_is_refused_with_the_fix():
    layer = LayerAttention("moba", 4, 2, "auto")
    q, k, v = random_qkv(10, HEADS["mha"])
    valid = torch.tensor([[True] * 7 + [False] * 2 + [True]])
    with pytest.raises(ValueError, match="padding_side='left'.*decode: full"):
        attend_cached(as_cache(q[9:]), as_cache(k), as_cache(v), valid, layer, None, BlockMeans(4))


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_decode_full_is_dense_causal_attention(padded):
    """decode: full (the paper's setting): a MoBA layer attends every earlier key while decoding."""
    layer = LayerAttention("moba", 4, 2, "auto", decode="full")
    T, pad = 30, 3 if padded else 0
    q, k, v = random_qkv(T, HEADS["gqa"], seed=3)
    want = F.scaled_dot_product_attention(as_cache(q), as_cache(k), as_cache(v), is_causal=True, enable_gqa=True)
    sparse = operator(q, k, v, [T], 4, 2)
    padding = torch.full((1, HEADS["gqa"][1], pad, D), 1e3)
    keys, values = torch.cat([padding, as_cache(k)], 2), torch.cat([padding, as_cache(v)], 2)
    valid = torch.arange(pad + T)[None] >= pad if padded else None
    for t in range(10, T):
        got = attend_cached(as_cache(q[t:t + 1]), keys[:, :, :pad + t + 1], values[:, :, :pad + t + 1],
                            None if valid is None else valid[:, :pad + t + 1], layer, None)
        torch.testing.assert_close(got[0, 0], want[0, :, t], **TOL)
    assert not torch.allclose(got[0, 0], sparse[T - 1], atol=1e-3)   # and that is not what MoBA gives


def test_a_decoding_step_on_cuda_names_sdpa_kernels_and_the_cpu_keeps_sdpa_choosing():
    """SDPA's own choice pays tens of milliseconds whenever the key length is new, as it is at every decoding step
    (docs/benchmarks.md): on CUDA an unmasked step runs FlashAttention's kernel, a masked (padded) one cuDNN's,
    which takes a mask; the CPU keeps SDPA's own choice."""
    with cached_attention.decode_sdpa_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    with cached_attention.decode_sdpa_backends(torch.device("cuda"), masked=True):
        assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    for masked in (False, True):
        with cached_attention.decode_sdpa_backends(torch.device("cpu"), masked=masked):
            assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_the_dense_step_asks_for_the_masked_list_exactly_when_it_passes_a_mask(monkeypatch):
    asked = []
    real = cached_attention.decode_sdpa_backends

    def recording(device, masked=False):
        asked.append(masked)
        return real(device, masked)

    monkeypatch.setattr(cached_attention, "decode_sdpa_backends", recording)
    layer = LayerAttention("full", 16, 2, "auto")
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    valid = torch.arange(20)[None] >= torch.tensor([0, 5])[:, None]
    unmasked = attend_cached(q, k, v, None, layer, None)
    masked = attend_cached(q, k, v, valid, layer, None)
    assert asked == [False, True]
    torch.testing.assert_close(masked[0], unmasked[0])           # row 0 has no padding: the same keys


def greedy_by_recomputing(model, prompt, new_tokens):
    """Greedy decoding that runs the whole sequence through the model (the operator) at every step."""
    seq, step_logits = prompt, []
    for _ in range(new_tokens):
        last = logits(model, input_ids=seq)[:, -1]
        step_logits.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, step_logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_equals_recomputing_with_the_operator(family):
    model = with_plan(stock_model(family), MOBA)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=14, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)   # 24 tokens: blocks 3..5 complete while decoding
    want, want_logits = greedy_by_recomputing(model, prompt, 14)
    assert torch.equal(out.sequences, want)
    for got, ref in zip(out.logits, want_logits):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    states = model.model.layers[0].self_attn.moba_train.kv_caches.by_cache[output_cache(out)]
    assert states.complete == [23 // 4]   # the last token was never fed back, so 23 keys are cached


def test_block_means_are_computed_once_per_block_not_per_step(monkeypatch):
    """Decoding reads each cached key once for the gate (when its block completes), not at every step."""
    reduced = []

    def counting_block_means(k, layout, centroids="reference"):
        reduced.append(k.shape[0])
        return block_means(k, layout, centroids)

    monkeypatch.setattr(block_means_module, "block_means", counting_block_means)
    model = with_plan(stock_model("llama"), MOBA)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=30, do_sample=False)
    layers = model.config.num_hidden_layers
    assert sum(reduced) == layers * (39 // 4) * 4      # every complete block of the 39 cached keys, once
    assert len(reduced) == layers * (1 + (39 // 4 - 10 // 4))   # the prompt's blocks, then one call per new block


def test_a_padded_batch_reads_its_mask_back_once_per_step_not_once_per_layer(monkeypatch):
    """Each read of the mask waits for the GPU; every layer of a forward gets the same mask tensor, so the left
    padding is read once per generate and the 'appended tokens are real' check once per decoding step."""
    computed = []
    real_once = mask_facts.once_per_mask

    def counting(mask, fact, compute):
        return real_once(mask, fact, lambda: (computed.append(fact[0]), compute())[1])

    monkeypatch.setattr(block_means_module, "once_per_mask", counting)
    model = with_plan(stock_model("llama"), MOBA)
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(ids * mask, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert model.config.num_hidden_layers > 1
    # 5 decoding steps after the prefill: the first builds the block means (the left padding, read once for every
    # layer), each of the other 4 checks its appended token once for every layer
    assert computed.count("left padding") == 1
    assert computed.count("real from") == 4
    for row in range(2):                               # and the batch still decodes each row as alone
        alone = model.generate(ids[row:row + 1, 3 * row:], max_new_tokens=6, do_sample=False)
        assert torch.equal(out[row, 3 * row:], alone[0])


def test_a_mask_written_in_place_is_read_again():
    mask = torch.ones(1, 6, dtype=torch.bool)
    assert mask_facts.once_per_mask(mask, "all", lambda: bool(mask.all())) is True
    mask[0, 2] = False
    assert mask_facts.once_per_mask(mask, "all", lambda: bool(mask.all())) is False


def test_cache_changed_outside_decoding_rebuilds_the_means(caplog):
    """crop (assisted decoding's rollback) replaces the cache's keys: the means start over, results stay exact."""
    model = with_plan(stock_model("llama"), MOBA)
    seq = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(6))
    want = logits(model, input_ids=seq)
    with torch.no_grad():
        cache = output_cache(model(input_ids=seq[:, :9], use_cache=True))
        kw = model_cache_keyword(model)
        for t in range(9, 22):
            model(input_ids=seq[:, t:t + 1], **{kw: cache}, use_cache=True)
        cache.crop(-7)                                   # back to 15 tokens
        for t in range(15, 30):
            out = model(input_ids=seq[:, t:t + 1], **{kw: cache}, use_cache=True)
            torch.testing.assert_close(out.logits[0, -1], want[0, t], atol=2e-5, rtol=1e-5)
    assert "rebuilt from the cache" in caplog.text


def test_beam_search_equals_beam_search_without_cache():
    """Beam search reorders the cache every step; the block means follow."""
    model = with_plan(stock_model("llama"), MOBA)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=10, do_sample=False, num_beams=3, num_return_sequences=3)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


def test_decode_mode_reaches_the_layers():
    base = stock_model("llama")
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(8))
    runs = {}
    for mode in ("moba", "full"):
        model = with_plan(base, {**MOBA, "decode": mode})
        with torch.no_grad():
            runs[mode] = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True).logits
    torch.testing.assert_close(runs["moba"][0], runs["full"][0])      # the first token comes from the prefill
    assert not torch.allclose(runs["moba"][1], runs["full"][1], atol=1e-4)


def test_plan_decode_key_default_and_validation():
    plan = AttentionPlan.from_config(MOBA, 2)
    assert plan.at(0).decode == "moba" and plan.to_config()["decode"] == "moba"
    dense = AttentionPlan.from_config({**MOBA, "decode": "full"}, 2)
    assert dense.at(0) == LayerAttention("moba", 4, 2, "auto", "full")
    assert dense.describe() == "moba(b4,k2,decode=full) layers 0-1"
    with pytest.raises(ValueError, match=r"decode must be one of \['moba', 'full'\].*got 'sparse'"):
        AttentionPlan.from_config({**MOBA, "decode": "sparse"}, 2)
    assert set(DECODE_MODES) == set(cached_attention.CACHED_ATTENTION)   # every mode the plan accepts runs


def test_plan_decode_backend_default_validation_and_a_missing_kernel_named_with_the_fix(monkeypatch):
    plan = AttentionPlan.from_config(MOBA, 2)
    assert plan.at(0).decode_backend == "auto" and plan.to_config()["decode_backend"] == "auto"
    assert set(DECODE_BACKENDS) - {"auto"} == set(cached_attention.DECODE_BACKENDS)   # every name the plan takes runs
    with pytest.raises(ValueError, match=r"decode_backend must be one of \['auto', 'torch', 'triton'\].*got 'cuda'"):
        AttentionPlan.from_config({**MOBA, "decode_backend": "cuda"}, 2)
    assert cached_attention.decode_backend(plan.at(0), torch.device("cpu")) == "torch"    # auto: the kernel on CUDA only
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = AttentionPlan.from_config({**MOBA, "decode_backend": "triton"}, 2).at(0)
    with pytest.raises(RuntimeError, match="decode_backend=triton: .*set attention.decode_backend=torch"):
        cached_attention.decode_backend(kernel, torch.device("cpu"))


LAYOUTS = {
    "contiguous": lambda x: x,
    "slice-of-longer-cache": lambda x: torch.cat([x, x], dim=2)[:, :, 3:3 + x.shape[2]],   # a cropped cache
    "token-major": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),                 # [B, K, H, D] storage
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_gathered_rows_equal_advanced_indexing(layout):
    g = torch.Generator().manual_seed(9)
    x = layout(torch.randn(3, 2, 20, D, generator=g))
    slots = torch.randint(0, 20, (3, 2, 7), generator=g)
    want = x[torch.arange(3)[:, None, None], torch.arange(2)[None, :, None], slots]
    keys, values = cached_attention._gather(x, x + 1, slots)
    assert torch.equal(keys, want) and torch.equal(values, want + 1)


@pytest.mark.parametrize("plan", [MOBA, {**MOBA, "moba_layers": "none"}], ids=["moba", "full"])
def test_static_cache_is_refused_with_the_fix(plan):
    """A static cache hands attention its whole preallocated buffer: empty slots would be attended."""
    model = with_plan(stock_model("llama"), plan)
    with pytest.raises(ValueError, match="static KV caches.*use the default DynamicCache"):
        model.generate(torch.zeros(1, 5, dtype=torch.long), max_new_tokens=2, do_sample=False,
                       cache_implementation="static")
