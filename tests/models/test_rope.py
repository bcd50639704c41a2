"""set_rope on a live model equals a model freshly built with the new RoPE settings and the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from moba_train.models import export_model, set_rope
from moba_train.models.rope import rotary_modules
from tests.models.tiny import FAMILIES, logits, stock_model, with_plan

FULL = {"block_size": 8, "topk": 2, "moba_layers": "none"}
SEQ = 48   # longer than the models' 32 positions, so dynamic scaling kicks in
CHANGES = {
    "theta-1e6": dict(theta=1e6),
    "linear-2": dict(scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic-2": dict(scaling={"rope_type": "dynamic", "factor": 2.0}),
    "yarn-4": dict(scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                   max_position_embeddings=128),
    "llama3-4+theta": dict(theta=5e5, scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                           max_position_embeddings=128),
}


def model_with_plan(family="llama", **overrides):
    return with_plan(stock_model(family, **{"max_position_embeddings": 32, **overrides}), FULL)


def fresh_like(model, family="llama"):
    """A new model built from the given model's current RoPE config, with its weights."""
    fresh = model_with_plan(family, rope_parameters=dict(model.config.rope_parameters),
                            max_position_embeddings=model.config.max_position_embeddings)
    fresh.load_state_dict(model.state_dict())
    return fresh


def ids():
    return torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_set_rope_equals_fresh_model(change):
    model = model_with_plan()
    before = logits(model, input_ids=ids())
    rotary = rotary_modules(model)[0]
    params = set_rope(model, **change)
    assert rotary_modules(model)[0] is rotary   # refreshed in place, not replaced
    assert model.config.rope_parameters == params
    after = logits(model, input_ids=ids())
    torch.testing.assert_close(after, logits(fresh_like(model), input_ids=ids()), atol=1e-6, rtol=0)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_theta_change_in_every_family(family):
    model = model_with_plan(family)
    set_rope(model, theta=2e5)
    assert model.config.rope_parameters["rope_theta"] == 2e5
    torch.testing.assert_close(logits(model, input_ids=ids()), logits(fresh_like(model, family), input_ids=ids()),
                               atol=1e-6, rtol=0)


def test_theta_alone_keeps_the_scaling_and_back_to_default_restores_the_model():
    model = model_with_plan()
    original = logits(model, input_ids=ids())
    set_rope(model, scaling={"rope_type": "linear", "factor": 2.0})
    assert set_rope(model, theta=1e5) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5}
    set_rope(model, theta=10000.0, scaling={"rope_type": "default"})
    torch.testing.assert_close(logits(model, input_ids=ids()), original, atol=0, rtol=0)


def test_yarn_defaults_the_original_length_to_the_length_so_far():
    model = model_with_plan()
    params = set_rope(model, scaling={"rope_type": "yarn", "factor": 4.0}, max_position_embeddings=128)
    assert params["original_max_position_embeddings"] == 32 and model.config.max_position_embeddings == 128
    # a later stage keeps the pretraining length rather than the stretched one
    assert set_rope(model, scaling={"rope_type": "yarn", "factor": 8.0},
                    max_position_embeddings=256)["original_max_position_embeddings"] == 32


def test_export_carries_the_final_rope(tmp_path):
    model = model_with_plan()
    plan = model.model.layers[0].self_attn.moba_train.plan
    set_rope(model, theta=1e6, scaling={"rope_type": "yarn", "factor": 4.0}, max_position_embeddings=128)
    saved = json.loads((export_model(model, None, tmp_path / "out", plan) / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                        "rope_theta": 1e6}
    assert saved["max_position_embeddings"] == 128


@pytest.mark.parametrize("kwargs, message", [
    (dict(scaling={"rope_type": "ntk"}), r"needs rope_type, one of \['default', 'dynamic', 'linear', 'llama3', 'yarn'\]"),
    (dict(scaling={"factor": 2.0}), "needs rope_type"),
    (dict(scaling={"rope_type": "linear"}), r"missing \['factor'\]"),
    (dict(scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}), r"unknown \['beta_fast'\]"),
    (dict(scaling={"rope_type": "llama3", "factor": 8.0}), r"missing \['low_freq_factor', 'high_freq_factor'\]"),
    (dict(scaling={"rope_type": "linear", "factor": 0.5}), "factor must be a number >= 1"),
    (dict(scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}), r"give rope_theta as set_rope\(theta=...\)"),
    (dict(theta=-1.0), "theta must be a positive number"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be an int >= 1"),
], ids=["unknown-type", "no-type", "linear-no-factor", "unknown-key", "llama3-missing", "factor-below-1",
        "theta-in-scaling", "negative-theta", "zero-length"])
def test_bad_rope_settings_raise_before_changing_anything(kwargs, message):
    model = model_with_plan()
    before = dict(model.config.rope_parameters)
    with pytest.raises(ValueError, match=message):
        set_rope(model, **kwargs)
    assert model.config.rope_parameters == before and model.config.max_position_embeddings == 32
