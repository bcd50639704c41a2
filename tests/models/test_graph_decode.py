"""greedy_decode and sample_decode (models/graph_decode.py): the device-length decoding loop that a CUDA graph
replays. Here, on the CPU, its dense layers (no kernel needed) against generate(), greedy and sampled, and its
refusals; the sparse layers' fused kernel under Triton's interpreter (tests/ops/test_moba_decode_triton_interpreter.py)
and on the GPU."""

from __future__ import annotations

import pytest
import torch

from moba_train.models import AttentionPlan, MobaKVCache, Sampling, attach_plan, greedy_decode, sample_decode
from moba_train.models.graph_decode import DecodingSteps
from moba_train.models.hf_compat import model_cache_keyword, output_cache
from tests.models.test_decode import MOBA
from tests.models.tiny import FAMILIES, stock_model, with_plan

DENSE_DECODING = {"moba-decode-full": {**MOBA, "decode": "full"}, "full": {**MOBA, "moba_layers": "none"}}


def _prompt(rows: tuple[int, ...], seed: int = 3):
    """Random prompts of these lengths, left-padded with token 0, and their attention mask (None for one row)."""
    P = max(rows)
    ids = torch.randint(1, 256, (len(rows), P), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for b, n in enumerate(rows):
        mask[b, P - n:] = 1
    return ids * mask, (mask if len(rows) > 1 else None)


@pytest.mark.parametrize("plan", DENSE_DECODING.values(), ids=DENSE_DECODING.keys())
@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_decoding_on_the_device_equals_generate(family, plan):
    model = with_plan(stock_model(family), plan)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids, mask = _prompt((9, 5, 7))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              **{model_cache_keyword(model): MobaKVCache.for_model(model, 21)})
    assert torch.equal(greedy_decode(model, ids, 12, attention_mask=mask), want)


def test_one_new_token_is_the_prefills_choice():
    model = with_plan(stock_model("llama"), DENSE_DECODING["full"])
    ids, _ = _prompt((6,))
    out = greedy_decode(model, ids, 1)
    with torch.no_grad():
        assert out[0, -1] == model(input_ids=ids).logits[0, -1].argmax()


def test_sparse_layers_without_the_kernel_are_refused_naming_the_fix():
    model = with_plan(stock_model("llama"), {**MOBA, "decode_backend": "torch"})
    with pytest.raises(ValueError, match="decode_backend=torch.*fused kernel.*generate"):
        greedy_decode(model, _prompt((6,))[0], 4)


@pytest.mark.parametrize("bad, match", [(dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
                                        (dict(max_new_tokens=3, cuda_graph=True), "cuda_graph=True needs")],
                         ids=["no-new-tokens", "graph-on-cpu"])
def test_bad_arguments_are_refused(bad, match):
    model = with_plan(stock_model("llama"), DENSE_DECODING["full"])
    with pytest.raises(ValueError, match=match):
        greedy_decode(model, _prompt((6,))[0], **bad)


def test_a_plan_changed_after_the_cache_was_built_is_refused():
    model = with_plan(stock_model("llama"), DENSE_DECODING["moba-decode-full"])
    ids, _ = _prompt((6,))
    kw = model_cache_keyword(model)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{kw: MobaKVCache.for_model(model, 10)})
        steps = DecodingSteps(model, output_cache(out), out.logits[:, -1], torch.tensor([[5]]), 4)
        steps.step()
        attach_plan(model, AttentionPlan.from_config({**MOBA, "decode": "full", "topk": 3},
                                                     model.config.num_hidden_layers))
        with pytest.raises(ValueError, match="build the cache again"):
            steps.step()


def test_the_cache_holds_no_more_than_its_capacity():
    model = with_plan(stock_model("llama"), DENSE_DECODING["full"])
    ids, _ = _prompt((6,))
    kw = model_cache_keyword(model)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{kw: MobaKVCache.for_model(model, 6)})
        with pytest.raises(ValueError, match="capacity 6 <= the prefill's 6 slots"):
            DecodingSteps(model, output_cache(out), out.logits[:, -1], torch.tensor([[5]]), 2)


def test_uninitialised_slots_past_the_length_do_not_reach_dense_attention():
    """The buffers come from torch.empty: NaN there (0 x NaN under a mask is NaN) must not reach any token."""
    model = with_plan(stock_model("llama"), DENSE_DECODING["full"])
    model.generation_config.eos_token_id = None
    ids, _ = _prompt((6,))
    kw = model_cache_keyword(model)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False, **{kw: MobaKVCache.for_model(model, 14)})
        cache = MobaKVCache.for_model(model, 14)
        out = model(input_ids=ids, use_cache=True, position_ids=torch.arange(6)[None], **{kw: cache})
        for layer in cache.layers:
            layer._keys[:, :, 6:] = float("nan")
            layer._values[:, :, 6:] = float("nan")
        steps = DecodingSteps(model, output_cache(out), out.logits[:, -1], torch.tensor([[5]]), 8)
        for _ in range(7):
            steps.step()
    assert torch.equal(torch.cat([ids, steps.tokens], 1), want)


def test_a_prefill_longer_than_the_capacity_is_refused_naming_the_capacity_asked_for():
    from moba_train.models.device_decode import DeviceDecodeLayer
    keys = torch.zeros(1, 2, 9, 16)
    with pytest.raises(ValueError, match="capacity 4 <= the prefill's 9 slots; allocate capacity >= prompt length"):
        DeviceDecodeLayer.from_prefill(keys, keys, 4, block_size=4, topk=2)


# Sampling settings, as generate() takes them (top_k 0 and top_p 1.0 turn its filters off).
SAMPLINGS = {"temperature": Sampling(temperature=0.7), "top-k": Sampling(top_k=5),
             "top-p": Sampling(temperature=1.3, top_p=0.8), "all-three": Sampling(temperature=0.9, top_k=20, top_p=0.6)}


def _generate_kwargs(sampling: Sampling) -> dict:
    return dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or 0,
                top_p=sampling.top_p if sampling.top_p is not None else 1.0)


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_sampled_decoding_draws_the_tokens_generate_draws(sampling):
    """Same seed, same draws: the filters are generate()'s and the draw is torch.multinomial's."""
    model = with_plan(stock_model("llama"), DENSE_DECODING["moba-decode-full"])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids, mask = _prompt((9, 5, 7))
    torch.manual_seed(11)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, **_generate_kwargs(sampling),
                              **{model_cache_keyword(model): MobaKVCache.for_model(model, 21)})
    torch.manual_seed(11)
    got = sample_decode(model, ids, 12, sampling, attention_mask=mask)
    assert torch.equal(got, want)
    torch.manual_seed(12)
    assert not torch.equal(sample_decode(model, ids, 12, sampling, attention_mask=mask), want)  # it does draw


def test_sampling_from_the_single_most_likely_token_is_greedy():
    model = with_plan(stock_model("qwen2"), DENSE_DECODING["full"])
    ids, mask = _prompt((9, 4))
    assert torch.equal(sample_decode(model, ids, 10, Sampling(temperature=2.0, top_k=1), attention_mask=mask),
                       greedy_decode(model, ids, 10, attention_mask=mask))


def generates_warpers(logits, sampling):
    """generate()'s warpers, in its order, on fp32 logits."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    scores = TemperatureLogitsWarper(sampling.temperature)(None, logits.clone())
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p is not None:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return scores


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_the_filters_are_generates_warpers(sampling):
    from moba_train.models.sampling import filtered_scores

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :25] = logits[0].max()                      # ties at the top-k border: every tied token stays
    got = filtered_scores(logits, sampling)
    torch.testing.assert_close(got, generates_warpers(logits, sampling))
    assert torch.isinf(got).any() or sampling.top_k is None and sampling.top_p is None   # the filters filtered


def test_a_draw_is_torch_multinomials_draw():
    from moba_train.models.sampling import draw

    scores = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    scores[:, ::3] = float("-inf")
    torch.manual_seed(5)
    want = torch.multinomial(scores.softmax(-1), 1)
    torch.manual_seed(5)
    got = draw(scores)
    assert torch.equal(got, want) and not (got % 3 == 0).any()


def test_draws_follow_the_filtered_distribution():
    from moba_train.models.sampling import draw, filtered_scores

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(40_000, 6)
    sampling = Sampling(temperature=0.8, top_k=4)
    scores = filtered_scores(logits, sampling)
    torch.manual_seed(0)
    counts = torch.bincount(draw(scores).flatten(), minlength=6).double()
    expected = scores[0].softmax(-1).double() * logits.shape[0]
    assert counts[4:].sum() == 0                                   # outside the top 4: never
    assert ((counts[:4] - expected[:4]).abs() / expected[:4].sqrt()).max() < 5   # within 5 standard deviations


@pytest.mark.parametrize("bad, match", [(dict(temperature=0.0), "temperature=0.0.*> 0.*greedy_decode"),
                                        (dict(temperature=float("nan")), "temperature=nan"),
                                        (dict(top_k=0), "top_k=0.*int >= 1"), (dict(top_k=2.5), "top_k=2.5"),
                                        (dict(top_p=0.0), r"top_p=0.0.*\(0, 1\]"), (dict(top_p=1.5), "top_p=1.5")],
                         ids=["zero-temperature", "nan-temperature", "top-k-0", "top-k-float", "top-p-0",
                              "top-p-above-1"])
def test_bad_sampling_settings_are_refused_naming_the_range(bad, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**bad)


def test_sample_decode_wants_a_sampling():
    model = with_plan(stock_model("llama"), DENSE_DECODING["full"])
    with pytest.raises(TypeError, match="moba_train.models.Sampling"):
        sample_decode(model, _prompt((6,))[0], 4, {"temperature": 0.7})


def _eos_ids_that_occur(tokens: torch.Tensor, at: tuple[int, ...]) -> list[int]:
    """For each row b, the token it produces at new-token index at[b] (that row's stop, as EOS id), where that
    token does not appear earlier in the row's new tokens (else the row would stop sooner)."""
    ids = []
    for b, i in enumerate(at):
        while int(tokens[b, i]) in tokens[b, :i].tolist():
            i += 1
        ids.append(int(tokens[b, i]))
    return ids


@pytest.mark.parametrize("check_every", [1, 5, 16])
@pytest.mark.parametrize("stops", ["every-row-stops", "one-row-never-stops"])
def test_decoding_stops_at_eos_as_generate_does(stops, check_every, monkeypatch):
    """Rows that produced an EOS id get the pad id; the result ends with the last row's EOS, or runs to
    max_new_tokens when a row never produces one: generate()'s result, whatever the check interval."""
    import moba_train.models.graph_decode as graph_decode

    monkeypatch.setattr(graph_decode, "EOS_CHECK_EVERY", check_every)
    model = with_plan(stock_model("llama"), DENSE_DECODING["moba-decode-full"])
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    ids, mask = _prompt((9, 5, 7))
    free = greedy_decode(model, ids, 20, attention_mask=mask)[:, ids.shape[1]:]
    eos = _eos_ids_that_occur(free, (3, 6, 2) if stops == "every-row-stops" else (3, 6))
    if stops == "one-row-never-stops":
        eos = [e for e in eos if e not in free[2].tolist()]
        assert eos, "the prompt's continuation left no usable EOS id: change the seed"
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, **{model_cache_keyword(model): MobaKVCache.for_model(model, 29)})
    got = greedy_decode(model, ids, 20, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert got.shape == want.shape and torch.equal(got, want)
    assert (want.shape[1] < ids.shape[1] + 20) == (stops == "every-row-stops")


def test_sampled_decoding_stops_at_eos_as_generate_does():
    model = with_plan(stock_model("llama"), DENSE_DECODING["full"])
    model.generation_config.eos_token_id = None
    ids, mask = _prompt((9, 5))
    sampling = Sampling(temperature=0.8, top_k=6)
    torch.manual_seed(2)
    free = sample_decode(model, ids, 16, sampling, attention_mask=mask)[:, ids.shape[1]:]
    eos = _eos_ids_that_occur(free, (4, 7))
    torch.manual_seed(2)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0,
                              **_generate_kwargs(sampling),
                              **{model_cache_keyword(model): MobaKVCache.for_model(model, 25)})
    torch.manual_seed(2)
    got = sample_decode(model, ids, 16, sampling, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want) and want.shape[1] < ids.shape[1] + 16


def test_the_pad_id_defaults_to_the_first_eos_id():
    model = with_plan(stock_model("llama"), DENSE_DECODING["full"])
    ids, mask = _prompt((7, 5))
    free = greedy_decode(model, ids, 12, attention_mask=mask)[:, 7:]
    first = _eos_ids_that_occur(free, (2,))[0]
    unseen = next(t for t in range(256) if t not in free.flatten().tolist())
    assert first not in free[1].tolist(), "row 1 produces row 0's EOS id too: change the seed"
    out = greedy_decode(model, ids, 12, attention_mask=mask, eos_token_id=[first, unseen])[:, 7:]
    stop = free[0].tolist().index(first)
    assert out.shape == free.shape                                  # row 1 never stops
    assert torch.equal(out[0, :stop + 1], free[0, :stop + 1]) and (out[0, stop + 1:] == first).all()
    assert torch.equal(out[1], free[1])


@pytest.mark.parametrize("bad, match", [(dict(eos_token_id="2"), "eos_token_id must be a token id"),
                                        (dict(eos_token_id=[1, -3]), "eos_token_id must be a token id"),
                                        (dict(eos_token_id=True), "eos_token_id must be a token id"),
                                        (dict(eos_token_id=2, pad_token_id=-1), "pad_token_id must be a token id")],
                         ids=["eos-string", "eos-negative", "eos-bool", "pad-negative"])
def test_bad_eos_and_pad_ids_are_refused(bad, match):
    model = with_plan(stock_model("llama"), DENSE_DECODING["full"])
    with pytest.raises(ValueError, match=match):
        greedy_decode(model, _prompt((6,))[0], 4, **bad)
