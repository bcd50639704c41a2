"""Every recipe composes and validates; bad configs fail before any model is built, naming the fix."""

from __future__ import annotations

import copy

import pytest

from moba_train.schema import ConfigError
from moba_train.config import load_run_config
from moba_train.trainer.schedule import lr_at
from moba_train.config import LRConfig
from tests.trainer.compose import RECIPES, compose_config, recipe_overrides


def test_the_required_recipes_exist():
    assert {"demo", "llama3_8b_128k_to_1m", "moba_full_90_10", "sft_layer_hybrid", "qwen_8k_to_128k", "tiny"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe):
    cfg = load_run_config(compose_config(recipe_overrides(recipe)))
    assert cfg.run_name == recipe and cfg.stages


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_states_what_it_reproduces_and_how_to_launch(recipe):
    from tests.trainer.compose import ROOT
    text = (ROOT / "recipes" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_\n# ")
    assert "moba-train" in text.split("\n\n")[0] or "--module moba_train" in text


def test_default_recipe_is_demo():
    assert compose_config([])["run_name"] == "demo"


def _demo():
    return compose_config(["recipe=demo"])


BAD = {
    "unknown-top-level-key": (lambda c: c.update(trainr={}), "unknown key(s) ['trainr']"),
    "unknown-stage-key": (lambda c: c["stages"][0].update(seqlen=5), "stages[0]: unknown key(s) ['seqlen']"),
    "seq-len-not-multiple-of-block": (lambda c: c["stages"][0].update(seq_len=1000), "divisible by the MoBA block_size"),
    "seq-len-not-multiple-of-sp": (lambda c: c["stages"][0].update(seq_len=1023, sequence_parallel=2), "divisible by sequence_parallel=2"),
    "topk-zero": (lambda c: c["attention"].update(topk=0), "attention: topk must be an int >= 1"),
    "stages-shrink": (lambda c: c["stages"][1].update(seq_len=256), "shorter than the previous stage"),
    "neither-tokens-nor-steps": (lambda c: c["stages"][0].pop("steps"), "exactly one of `tokens` or `steps`"),
    "both-tokens-and-steps": (lambda c: c["stages"][0].update(tokens=100), "exactly one of `tokens` or `steps`"),
    "no-stages": (lambda c: c.update(stages=[]), "at least one stage"),
    "duplicate-stage-names": (lambda c: c["stages"][1].update(name=c["stages"][0]["name"]), "unique"),
    "zero-stage-5": (lambda c: c["deepspeed"].update(zero_stage=5), "zero_stage must be 0-3"),
    "offload-params-without-zero3": (lambda c: c["deepspeed"].update(offload_params=True), "use deepspeed=zero3_offload"),
    "wrong-type": (lambda c: c["trainer"].update(grad_clip="big"), "trainer.grad_clip: expected float"),
    "bad-mode": (lambda c: c["stages"][0].update(mode="rl"), "is not one of ['pretrain', 'sft']"),
    "optimizer-not-importable": (lambda c: c["trainer"]["optimizer"].update(_target_="torch.optim.Adamw"),
                                 "is not an importable class; use e.g. torch.optim.AdamW"),
    "optimizer-not-an-optimizer": (lambda c: c["trainer"]["optimizer"].update(_target_="torch.nn.Linear"),
                                   "is not a torch.optim.Optimizer"),
    "optimizer-unknown-argument": (lambda c: c["trainer"]["optimizer"].update(_target_="torch.optim.SGD"),
                                   "SGD takes no ['betas', 'eps']"),
    "optimizer-lr": (lambda c: c["trainer"]["optimizer"].update(lr=1.0), "comes from each stage's lr.peak"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_config_fails_with_a_message_naming_the_fix(case):
    mutate, message = case
    raw = copy.deepcopy(_demo())
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        load_run_config(raw)
    assert message in str(err.value)


def test_lr_schedule_warmup_then_cosine_to_floor():
    lr = LRConfig(peak=1.0, warmup=2, schedule="cosine", min_ratio=0.1)
    values = [lr_at(s, 10, lr) for s in range(10)]
    assert values[0] < values[1] < values[2] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))
    assert lr_at(3, 10, LRConfig(peak=2.0, schedule="constant")) == 2.0


def test_optimizer_is_instantiated_from_its_target_with_decay_on_matrices_only():
    import torch

    from moba_train.trainer.engine import make_optimizer

    raw = _demo()
    raw["trainer"]["optimizer"] = {"_target_": "torch.optim.SGD", "momentum": 0.9, "weight_decay": 0.01}
    cfg = load_run_config(raw)
    opt = make_optimizer(torch.nn.Linear(4, 3), cfg, lr=0.5)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in opt.param_groups] == [(1, 0.01, 0.5), (1, 0.0, 0.5)]
