"""MobaKVCache: buffers allocated once and appended in place, block means beside the keys; generation with it
equals recomputing the whole sequence with the operator, and equals transformers' DynamicCache."""

from __future__ import annotations

import logging

import pytest
import torch

import moba_train.models.block_means as block_means_module
from moba_train.models import MobaKVCache
from moba_train.models.hf_compat import model_cache_keyword
from moba_train.ops.moba import block_means
from tests.models.test_decode import MOBA, greedy_by_recomputing
from tests.models.tiny import FAMILIES, logits, stock_model, with_plan

PLANS = {"moba-sparse": MOBA, "moba-decode-full": {**MOBA, "decode": "full"}, "full": {**MOBA, "moba_layers": "none"}}


def generate(model, prompt, cache=None, **kwargs):
    """Greedy generation, with `cache` under the keyword this transformers takes it by (or its default cache)."""
    if cache is not None:
        kwargs[model_cache_keyword(model)] = cache
    model.generation_config.eos_token_id = None     # every step generates, as greedy_by_recomputing does
    with torch.no_grad():
        return model.generate(prompt, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_equals_recomputing_and_the_dynamic_cache(family, plan):
    model = with_plan(stock_model(family), plan)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, MobaKVCache.for_model(model, 24), max_new_tokens=14)
    if plan.get("decode") != "full":        # decode: full attends densely while decoding, unlike the operator
        want, want_logits = greedy_by_recomputing(model, prompt, 14)
        assert torch.equal(out.sequences, want)
        for got, ref in zip(out.logits, want_logits):
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    dynamic = generate(model, prompt, max_new_tokens=14)
    for got, ref in zip(out.logits, dynamic.logits):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_the_cache_is_written_in_place_and_attention_gets_views_of_it():
    model = with_plan(stock_model("llama"), MOBA)
    cache = MobaKVCache.for_model(model, 40)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    kw = model_cache_keyword(model)
    with torch.no_grad():
        model(input_ids=prompt, **{kw: cache}, use_cache=True)
        layer = cache.layers[0]
        buffer = layer._keys.data_ptr()
        for t in range(12):
            model(input_ids=prompt[:, :1], **{kw: cache}, use_cache=True)
            assert layer._keys.data_ptr() == buffer                 # never reallocated, never concatenated
            assert layer.keys._base is layer._keys and layer.keys.shape[2] == 10 + t
    assert cache.get_seq_length() == 21 and cache.get_max_length() == 40
    assert layer.block_means.complete == [21 // 4]                  # the gate's means live beside the keys


def test_block_means_are_computed_once_per_block(monkeypatch):
    reduced = []

    def counting_block_means(k, layout, centroids="reference"):
        reduced.append(k.shape[0])
        return block_means(k, layout, centroids)

    monkeypatch.setattr(block_means_module, "block_means", counting_block_means)
    model = with_plan(stock_model("llama"), MOBA)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    generate(model, prompt, MobaKVCache.for_model(model, 40), max_new_tokens=30)
    layers = model.config.num_hidden_layers
    assert sum(reduced) == layers * (39 // 4) * 4
    assert len(reduced) == layers * (1 + (39 // 4 - 10 // 4))


def test_left_padded_batch_equals_the_dynamic_cache():
    model = with_plan(stock_model("qwen2"), MOBA)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 256, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 5, 9)):
        ids[row, :pad], mask[row, :pad] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=11, pad_token_id=0)
    ours = generate(model, ids, MobaKVCache.for_model(model, 24), **kwargs)
    dynamic = generate(model, ids, **kwargs)
    assert torch.equal(ours.sequences, dynamic.sequences)
    for got, ref in zip(ours.logits, dynamic.logits):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_a_cropped_cache_keeps_its_block_means_and_stays_exact(caplog, monkeypatch):
    """crop (assisted decoding's rollback) truncates the means instead of rebuilding them from the keys."""
    reduced = []
    monkeypatch.setattr(block_means_module, "block_means",
                        lambda k, layout, centroids="reference": reduced.append(k.shape[0]) or block_means(
                            k, layout, centroids))
    model = with_plan(stock_model("llama"), MOBA)
    seq = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(6))
    want = logits(model, input_ids=seq)
    cache = MobaKVCache.for_model(model, 30)
    kw = model_cache_keyword(model)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        model(input_ids=seq[:, :9], **{kw: cache}, use_cache=True)
        for t in range(9, 22):
            model(input_ids=seq[:, t:t + 1], **{kw: cache}, use_cache=True)
        cache.crop(-7)                                   # back to 15 tokens: blocks 0-2 stay complete
        assert cache.get_seq_length() == 15 and cache.layers[0].block_means.complete == [3]
        reduced.clear()
        for t in range(15, 30):
            out = model(input_ids=seq[:, t:t + 1], **{kw: cache}, use_cache=True)
            torch.testing.assert_close(out.logits[0, -1], want[0, t], atol=2e-5, rtol=1e-5)
    assert "rebuilt" not in caplog.text
    assert sum(reduced) == model.config.num_hidden_layers * (30 // 4 - 3) * 4   # only the blocks completed since


def test_beam_search_equals_beam_search_without_a_cache():
    """Beam search reorders the rows every step: keys, values and block means follow, in place."""
    model = with_plan(stock_model("llama"), MOBA)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=10, do_sample=False, num_beams=3, num_return_sequences=3)
    with torch.no_grad():
        cached = model.generate(prompt, **{model_cache_keyword(model): MobaKVCache.for_model(model, 20)}, **kwargs)
        recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


def test_a_cache_too_small_says_how_large_it_must_be():
    model = with_plan(stock_model("llama"), MOBA)
    with pytest.raises(ValueError, match="holds 12 tokens per layer and this step would make 13; create it with "
                                         "max_cache_len >= prompt length \\+ max_new_tokens"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), MobaKVCache.for_model(model, 12), max_new_tokens=5)


def test_a_reset_cache_generates_as_a_new_one():
    model = with_plan(stock_model("llama"), MOBA)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(8))
    cache = MobaKVCache.for_model(model, 30)
    first = generate(model, prompt, cache, max_new_tokens=12).sequences
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layers[0].block_means is None
    assert torch.equal(generate(model, prompt, cache, max_new_tokens=12).sequences, first)
