"""The KV cache reaches moba-train's decode hook under whatever name the installed transformers uses.

If a transformers release renames the attention modules' cache argument again, these tests fail
and say which name each family's attention now takes (instead of decoding silently without a cache).
"""

from __future__ import annotations

import pytest
import torch

from moba_train.models import AttentionPlan, attach_plan, attention_modules
from moba_train.models.hf_compat import CACHE_KEYWORDS, cache_argument, model_cache_keyword, output_cache
from tests.models.tiny import FAMILIES, stock_model, with_plan

MOBA = {"block_size": 4, "topk": 2, "moba_layers": "all"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_takes_its_kv_cache_by_a_known_keyword(family):
    model = stock_model(family)
    for module in attention_modules(model):
        argument = cache_argument(module)     # raises, naming forward's parameters, if none is known
        assert argument.keyword in CACHE_KEYWORDS
    assert model_cache_keyword(model) in CACHE_KEYWORDS


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_decode_hook_sees_the_cache_of_every_decoding_call(family):
    """During generate(), every attention call of every layer brings the cache object generate() made."""
    model = with_plan(stock_model(family), MOBA)
    seen = []
    for module in attention_modules(model):
        module.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(m.moba_train.kv_caches.argument.read(args, kwargs)), with_kwargs=True)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(out)
    assert cache is not None
    missing = [i for i, (passed, got) in enumerate(seen) if not passed or got is not cache]
    keywords = model.model.layers[0].self_attn.moba_train.kv_caches.last_call_keywords
    assert not missing, (f"{len(missing)} of {len(seen)} attention calls did not pass the cache as "
                         f"{cache_argument(model.model.layers[0].self_attn).keyword!r}; keywords passed: {keywords}")


class RenamedCacheAttention(torch.nn.Module):
    """An attention module from a future transformers that calls its cache `kv_store`."""

    def __init__(self, layer_idx):
        super().__init__()
        self.layer_idx, self.num_key_value_groups = layer_idx, 1

    def forward(self, hidden_states, attention_mask=None, kv_store=None, **kwargs):
        return hidden_states


class RenamedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([RenamedCacheAttention(0)])


def test_an_unknown_cache_keyword_is_refused_when_the_plan_is_attached_naming_the_parameters():
    model = RenamedModel()
    with pytest.raises(ValueError, match=r"RenamedCacheAttention.forward takes \['hidden_states', 'attention_mask', "
                                         r"'kv_store', 'kwargs'\].*renamed the cache argument"):
        attach_plan(model, AttentionPlan.from_config(MOBA, 1))


def test_a_decoding_call_without_the_cache_names_the_keyword_it_expected():
    model = with_plan(stock_model("llama"), MOBA)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 1, 16)
    kv = torch.randn(1, 2, 9, 16)
    attn.moba_train.kv_caches.last_call_keywords = ["hidden_states", "kv_store"]
    from moba_train.models.attention import moba_train_attention
    with pytest.raises(RuntimeError, match=rf"passed no {cache_argument(attn).keyword!r} \(keywords passed: "
                                           r"\['hidden_states', 'kv_store'\]\)"):
        moba_train_attention(attn, q, kv, kv, None)


def test_activation_checkpointing_before_transformers_5_20_keeps_every_nth_layer(monkeypatch):
    """transformers < 5.20 has only gradient_checkpointing_enable: every_n_layers is applied by hand, the same
    layers recompute as with activation_checkpointing_enable, and CPU offload is refused with the fix."""
    import transformers

    from moba_train.models import build_from_config
    from moba_train.models.hf_compat import enable_activation_checkpointing

    cfg = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2)
    new = build_from_config(cfg, seed=0)
    enable_activation_checkpointing(new, every_n_layers=2)
    current = getattr(transformers.PreTrainedModel, "activation_checkpointing_enable", None)
    if current is not None:    # this transformers is >= 5.20: make it look like 5.17 (every layer, no every_n_layers)
        monkeypatch.setattr(transformers.PreTrainedModel, "gradient_checkpointing_enable",
                            lambda self, gradient_checkpointing_kwargs=None:
                            current(self, activation_checkpointing_kwargs=gradient_checkpointing_kwargs))
        monkeypatch.delattr(transformers.PreTrainedModel, "activation_checkpointing_enable")
    old = build_from_config(cfg, seed=0)
    assert not hasattr(old, "activation_checkpointing_enable")
    enable_activation_checkpointing(old, every_n_layers=2)
    flags = [[layer.gradient_checkpointing for layer in m.model.layers] for m in (new, old)]
    assert flags == [[True, False, True, False]] * 2
    with pytest.raises(ValueError, match="offload_activations needs transformers' activation_checkpointing_enable"):
        enable_activation_checkpointing(old, offload=True)
