"""The registered attention function inside real (tiny) models of each supported family."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from moba_train.models import ATTN_IMPLEMENTATION, AttentionPlan, attach_plan, build_from_config
from moba_train.models.hf_compat import enable_activation_checkpointing, model_cache_keyword, output_cache
from tests.models.tiny import FAMILIES, logits, pack, random_docs, stock_model, tiny_config, with_plan

FULL = {"block_size": 4, "topk": 2, "moba_layers": "none"}
MOBA = {"block_size": 4, "topk": 2, "moba_layers": "all"}             # real sparsity: 2 of up to 8 blocks
MOBA_ALL_BLOCKS = {"block_size": 4, "topk": 1000, "moba_layers": "all"}
MIXED = {"block_size": 4, "topk": 2, "moba_layers": {"all_but_last": 1}}
PLANS = {"full": FULL, "moba": MOBA, "mixed": MIXED}
DOC_LENS = (13, 30, 21)
TOL = dict(atol=2e-5, rtol=1e-5)

families = pytest.mark.parametrize("family", list(FAMILIES))


@families
def test_all_full_equals_stock_sdpa(family):
    ref = stock_model(family)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(with_plan(ref, FULL), input_ids=ids), logits(ref, input_ids=ids), **TOL)


@families
def test_all_moba_with_topk_covering_every_block_equals_full(family):
    ref = stock_model(family)
    batch = pack(random_docs(DOC_LENS))
    torch.testing.assert_close(logits(with_plan(ref, MOBA_ALL_BLOCKS), **batch), logits(with_plan(ref, FULL), **batch),
                               **TOL)


@families
def test_moba_with_small_topk_differs_from_full(family):
    ref = stock_model(family)
    batch = pack(random_docs(DOC_LENS))
    diff = (logits(with_plan(ref, MOBA), **batch) - logits(with_plan(ref, FULL), **batch)).abs().max()
    assert diff > 1e-3


@families
@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_packed_documents_are_isolated(family, plan):
    """Changing one document of a pack leaves every other document's logits unchanged, and each
    document's logits equal those of the document run alone."""
    model = with_plan(stock_model(family), plan)
    docs = random_docs(DOC_LENS)
    before = logits(model, **pack(docs))[0]
    docs_changed = [docs[0], torch.flip(docs[1], [0]), docs[2]]
    after = logits(model, **pack(docs_changed))[0]
    a, b = DOC_LENS[0], DOC_LENS[0] + DOC_LENS[1]
    torch.testing.assert_close(after[:a], before[:a], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[b:], before[b:], atol=1e-6, rtol=0)
    assert not torch.allclose(after[a:b], before[a:b])
    start = 0
    for doc in docs:
        alone = logits(model, input_ids=doc[None])[0]
        torch.testing.assert_close(before[start:start + len(doc)], alone, **TOL)
        start += len(doc)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_boundaries_from_position_ids_equal_cu_seqlens(plan):
    model = with_plan(stock_model("llama"), plan)
    batch = pack(random_docs(DOC_LENS))
    from_position_ids = logits(model, input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    torch.testing.assert_close(from_position_ids, logits(model, **batch), atol=0, rtol=0)


def test_batch_rows_are_separate_documents():
    model = with_plan(stock_model("qwen3"), MOBA)
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    rows = torch.cat([logits(model, input_ids=ids[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(logits(model, input_ids=ids), rows, **TOL)


def test_packed_rows_flatten_with_global_cu_seqlens():
    """The trainer's layout: B rows, cu_seqlens over the B*L flattened tokens."""
    model = with_plan(stock_model("llama"), MIXED)
    row0, row1 = random_docs((10, 14), seed=3), random_docs((5, 19), seed=4)
    p0, p1 = pack(row0), pack(row1)
    cu = torch.tensor([0, 10, 24, 29, 48], dtype=torch.int32)
    batch = dict(input_ids=torch.cat([p0["input_ids"], p1["input_ids"]]),
                 position_ids=torch.cat([p0["position_ids"], p1["position_ids"]]),
                 cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=19, max_length_k=19)
    torch.testing.assert_close(logits(model, **batch), torch.cat([logits(model, **p0), logits(model, **p1)]), **TOL)


@families
def test_gradients_equal_stock_sdpa(family):
    ref = stock_model(family).train()
    ours = with_plan(ref, FULL).train()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    for model in (ref, ours):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_moba_training_step_backpropagates():
    model = with_plan(stock_model("llama"), MOBA).train()
    batch = pack(random_docs(DOC_LENS))
    model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@families
def test_greedy_generate_matches_stock_sdpa(family):
    ref = stock_model(family)
    prompt = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(6))
    want = ref.generate(prompt, max_new_tokens=12, do_sample=False)
    got = with_plan(ref, FULL).generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("plan", [MOBA, MIXED], ids=["moba", "mixed"])
def test_moba_decoding_with_cache_equals_recomputing_without(plan):
    """Each cached decoding step gives the logits a full forward of the whole sequence gives."""
    model = with_plan(stock_model("llama"), plan)
    seq = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(7))
    full = logits(model, input_ids=seq)
    with torch.no_grad():
        out = model(input_ids=seq[:, :9], use_cache=True)
        cache = output_cache(out)
        kw = model_cache_keyword(model)
        for t in range(9, 30):   # crosses several block boundaries (block_size 4)
            out = model(input_ids=seq[:, t:t + 1], **{kw: cache}, use_cache=True)
            torch.testing.assert_close(out.logits[0, -1], full[0, t], **TOL)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_left_padded_batch_equals_each_prompt_alone(plan):
    model = with_plan(stock_model("llama"), plan)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, 256, (n,), generator=g) for n in (7, 15)]
    ids = torch.zeros(2, 15, dtype=torch.long)
    mask = torch.zeros(2, 15, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 15 - len(p):], mask[i, 15 - len(p):] = p, 1
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            alone = model.generate(input_ids=p[None], max_new_tokens=6, do_sample=False, pad_token_id=0,
                                   output_logits=True, return_dict_in_generate=True)
        assert torch.equal(batched.sequences[i, 15:], alone.sequences[0, len(p):])
        for step_b, step_a in zip(batched.logits, alone.logits):
            torch.testing.assert_close(step_b[i], step_a[0], **TOL)


def test_plan_switch_at_scheduled_progress_changes_the_model():
    ref = stock_model("llama")
    batch = pack(random_docs(DOC_LENS))
    scheduled = with_plan(ref, {"block_size": 4, "topk": 2, "phases": [{"until": 0.9, "moba_layers": "all"},
                                                                       {"until": 1.0, "moba_layers": "none"}]})
    plan = scheduled.model.layers[0].self_attn.moba_train.plan
    want_moba, want_full = logits(with_plan(ref, MOBA), **batch), logits(with_plan(ref, FULL), **batch)
    torch.testing.assert_close(logits(scheduled, **batch), want_moba, atol=0, rtol=0)
    assert not plan.set_progress(0.85)
    torch.testing.assert_close(logits(scheduled, **batch), want_moba, atol=0, rtol=0)
    assert plan.set_progress(0.9)
    torch.testing.assert_close(logits(scheduled, **batch), want_full, atol=0, rtol=0)


def test_two_models_from_one_config_keep_their_own_plans():
    ref = stock_model("llama")
    cfg = copy.deepcopy(ref.config)
    a, b = (AutoModelForCausalLM.from_config(cfg).eval() for _ in range(2))
    assert a.config is cfg and b.config is cfg   # transformers shares the config object between them
    for m in (a, b):
        m.load_state_dict(ref.state_dict())
    attach_plan(a, AttentionPlan.from_config(FULL, 3))
    attach_plan(b, AttentionPlan.from_config(MOBA, 3))
    assert cfg._attn_implementation == "sdpa"   # the shared config was left alone
    batch = pack(random_docs(DOC_LENS))
    torch.testing.assert_close(logits(a, **batch), logits(with_plan(ref, FULL), **batch), atol=0, rtol=0)
    torch.testing.assert_close(logits(b, **batch), logits(with_plan(ref, MOBA), **batch), atol=0, rtol=0)


def test_without_a_plan_the_error_names_attach_plan():
    model = stock_model("llama")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match=r"has no attention plan: call moba_train.models.attach_plan"):
        logits(model, input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_plan_with_wrong_layer_count_is_refused():
    with pytest.raises(ValueError, match=r"the plan covers 4 layers but LlamaForCausalLM has 3"):
        attach_plan(stock_model("llama"), AttentionPlan.from_config(FULL, 4))


def test_document_longer_than_sliding_window_is_refused():
    model = with_plan(stock_model("mistral", sliding_window=16), FULL)
    with pytest.raises(ValueError, match=r"exceeds sliding_window=16.*set config.sliding_window = None"):
        logits(model, input_ids=torch.zeros(1, 20, dtype=torch.long))


def test_attention_dropout_is_refused_in_training():
    model = with_plan(stock_model("llama", attention_dropout=0.1), FULL).train()
    with pytest.raises(ValueError, match=r"set config.attention_dropout = 0.0"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)


def test_conflicting_cu_seqlens_are_refused():
    model = with_plan(stock_model("llama"), FULL)
    batch = pack(random_docs((4, 4)))
    batch["cu_seq_lens_k"] = torch.tensor([0, 2, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_k differs from cu_seq_lens_q"):
        logits(model, **batch)


def test_tiny_configs_cover_every_family():
    assert {tiny_config(f)["model_type"] for f in FAMILIES} == {"llama", "qwen2", "qwen3", "mistral"}


@pytest.mark.parametrize("plan", [FULL, MOBA_ALL_BLOCKS], ids=["full", "moba-all-blocks"])
def test_bf16_model_close_to_stock_sdpa(plan):
    """A small bf16 check only: bf16 matmuls are ~150x slower than fp32 on this CPU."""
    ref = stock_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(9))
    got = logits(with_plan(ref, plan), input_ids=ids)
    torch.testing.assert_close(got, logits(ref, input_ids=ids), atol=3e-2, rtol=3e-2)


def test_activation_checkpointing_keeps_the_packed_boundaries():
    """The recompute of a checkpointed layer gets the same varlen kwargs: identical loss and gradients."""
    ref = stock_model("llama")
    batch = pack(random_docs(DOC_LENS))
    grads = []
    for checkpointing in (False, True):
        model = with_plan(ref, MIXED).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_checkpointing_every_second_layer_recomputes_only_those():
    import types

    from moba_train.job.model_setup import apply_activation_checkpointing

    model = build_from_config(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2), seed=0)
    m = types.SimpleNamespace(activation_checkpointing=True, offload_activations=False, checkpoint_every_n_layers=2)
    apply_activation_checkpointing(model, m)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True, False]
    with pytest.raises(ValueError, match="checkpoint_every_n_layers must be >= 1"):
        apply_activation_checkpointing(model, types.SimpleNamespace(activation_checkpointing=True,
                                                                    offload_activations=False, checkpoint_every_n_layers=0))


def test_a_padded_prefill_reads_its_documents_back_once_per_forward(monkeypatch):
    """The unpadded documents' boundaries are read from the device; every layer gets the same mask and position
    ids, so one forward reads them once whatever its number of layers, and a changed position_ids reads again."""
    import moba_train.models.attention as attention

    calls = []
    real = attention._boundaries
    monkeypatch.setattr(attention, "_boundaries", lambda *a: (calls.append(1), real(*a))[1])
    model = with_plan(stock_model("llama"), {"block_size": 4, "topk": 2, "moba_layers": "all"})
    assert model.config.num_hidden_layers > 1
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        assert len(calls) == 1
        alone = model(input_ids=ids[:1, 5:]).logits
    torch.testing.assert_close(padded[0, 5:], alone[0], atol=2e-5, rtol=1e-5)

    padding = mask.bool()
    first = attention._unpadded_documents(padding, 2, 12, {"position_ids": torch.arange(12)[None]}, torch.device("cpu"))
    packed = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])   # a new document at 6 (row 0 keeps 5.. of it)
    again = attention._unpadded_documents(padding, 2, 12, {"position_ids": packed}, torch.device("cpu"))
    assert first[1].tolist() == [0, 7, 19] and again[1].tolist() == [0, 1, 7, 13, 19]
    packed[0, 6:] += 6                                                # written in place: one document again
    assert attention._unpadded_documents(padding, 2, 12, {"position_ids": packed},
                                         torch.device("cpu"))[1].tolist() == [0, 7, 19]


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 9), (3, 7)])
def test_whole_rows_need_no_read_from_the_device(monkeypatch, batch, seq):
    """No padding and no position ids: each row is one document, so the boundaries are known on the host; they equal
    what the general path computes from explicit positions."""
    import moba_train.models.attention as attention

    def no_read(*args, **kwargs):
        raise AssertionError("read back from the device")

    expected = attention._boundaries(batch, seq, None, {"position_ids": torch.arange(seq)[None]}, torch.device("cpu"))
    monkeypatch.setattr(torch.Tensor, "nonzero", no_read)
    keep, cu, max_len = attention._unpadded_documents(None, batch, seq, {}, torch.device("cpu"))
    assert keep is None and cu.dtype == torch.int32 and cu.tolist() == expected[0].tolist() and max_len == expected[1]
