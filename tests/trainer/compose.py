"""Compose the real Hydra configs the way `moba-train` does, for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from moba_train.config import register_schema

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
NEEDS_MODEL_PATH = {"llama3_8b_128k_to_1m", "qwen_8k_to_128k"}
# the first documents of a large local corpus are enough for a smoke step (tokenizing all takes minutes)
SMALLER_DATA = {recipe: ["+data.sources.code.max_documents=300"] for recipe in ("quality_code", "smollm2_moba")}


def compose_config(overrides: list[str]) -> dict:
    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)      # resolves ${hydra:runtime.choices.recipe}
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True)


def recipe_overrides(recipe: str) -> list[str]:
    extra = ["model.path=/nonexistent/model"] if recipe in NEEDS_MODEL_PATH else []
    return [f"recipe={recipe}", *extra, *SMALLER_DATA.get(recipe, [])]
