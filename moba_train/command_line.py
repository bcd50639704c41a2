"""What `moba-train` does with its arguments before Hydra sees them: --help, recipe=<file>, and a check of
every `key=value` override against the schema, so that a misspelt key gets a suggestion, not a stack trace."""

from __future__ import annotations

import dataclasses
import tempfile
import types
import typing
from pathlib import Path

from moba_train.schema import did_you_mean

HELP = """\
moba-train: long-context continual pretraining with MoBA (docs/training.md)

  moba-train [recipe=NAME|recipe=path/to/recipe.yaml] [key=value ...]    train (default recipe: demo)
  moba-train mode=eval checkpoint=PATH [recipe=NAME]      loss by position and passkey of an export or checkpoint
  moba-train mode=eval checkpoint=base [recipe=NAME]      ... of the recipe's model before training (a baseline)
  moba-train recipe=NAME dry_run=true nodes=N gpus_per_node=G [gpu_memory_gib=80] [dry_run_model=NAME]
                                                          check a cluster launch here: groups, rules, memory
  moba-train recipe=NAME debug=smoke                      the recipe's logic on a tiny model, one step a stage (CPU)
  deepspeed --num_gpus 8 --module moba_train recipe=NAME  the same on GPUs (docs/launch.md)

recipes: {recipes}
config groups (group=option): {groups}

common keys:
  model.path=DIR  model.dtype=auto|float32|bfloat16  model.activation_checkpointing=true
  attention.block_size=512  attention.topk=3  attention.backend=auto|{moba_backends}
  stages.0.seq_len=8192  stages.0.steps=100 | stages.0.tokens=1e9  '+stages.0.attention={{moba_layers: all}}'
  trainer.seed=0  trainer.checkpoint_every=200  trainer.resume=auto|never|DIR  trainer.export=true
  eval.passkey.enabled=true  eval.on_error=continue|fail  logger=wandb|none  paths.output_dir=DIR

Every key and its default: moba_train/config/run.py (`moba-train --cfg job` prints the composed config).
Hydra's own options: moba-train --hydra-help
"""


def help_text(config_dir: Path) -> str:
    from moba_train.ops.moba import BACKENDS

    recipes = sorted(p.stem for p in (config_dir / "recipe").glob("*.yaml"))
    groups = sorted(p.name for p in config_dir.iterdir() if p.is_dir() and p.name not in ("recipe", "hydra"))
    return HELP.format(recipes=", ".join(recipes), groups=", ".join(groups), moba_backends="|".join(sorted(BACKENDS)))


def recipe_from_file(argv: list[str], config_dir: Path) -> list[str]:
    """`recipe=path/to/file.yaml` -> the file offered to Hydra as a recipe of the same name (a search path of
    its own); SystemExit naming the fix when the file cannot serve as a recipe."""
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key != "recipe" or not (value.endswith((".yaml", ".yml")) or "/" in value):
            out.append(arg)
            continue
        path = Path(value).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(f"moba-train: recipe={value}: no such file; give a recipe name "
                             f"({', '.join(sorted(p.stem for p in (config_dir / 'recipe').glob('*.yaml')))}) or "
                             f"the path of a recipe file")
        if (config_dir / "recipe" / f"{path.stem}.yaml").is_file():
            raise SystemExit(f"moba-train: recipe={value} has the name of the built-in recipe {path.stem!r}; rename "
                             f"the file")
        if "@package _global_" not in path.read_text().split("\n\n")[0]:
            raise SystemExit(f"moba-train: recipe={value} must start with the line `# @package _global_` (a recipe "
                             f"overrides the whole config; see recipes/tiny.yaml)")
        search = Path(tempfile.mkdtemp(prefix="moba-train-recipe-"))
        (search / "recipe").mkdir()
        (search / "recipe" / path.name).symlink_to(path)
        out += [f"recipe={path.stem}", f"hydra.searchpath=[file://{search}]"]
    return out


def _fields(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(tp):
    """list[X] -> X, X | None -> X; dicts and Any stay."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _unwrap(inner[0]) if len(inner) == 1 else typing.Any
    return tp


def unknown_key(key: str) -> str | None:
    """Why `key` (dotted, as in key=value) names nothing in the schema, with the nearest key; None when it does,
    or when it lies under a free-form mapping (a stage's attention and data blocks, optimizer arguments)."""
    from moba_train.config.run import RunSchema

    node: typing.Any = RunSchema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        node = _unwrap(node)
        origin = typing.get_origin(node)
        if origin is list:
            if not part.isdigit():
                return None
            node = typing.get_args(node)[0]
            continue
        if origin is dict:
            node = typing.get_args(node)[1]
            continue
        if not dataclasses.is_dataclass(node):
            return None
        fields = _fields(node)
        if part not in fields:
            where = ".".join(parts[:depth]) or "the config"
            return f"unknown key {key!r}: {where} has no {part!r}{did_you_mean(part, fields)}"
        node = fields[part]
    return None


def check_overrides(argv: list[str], config_dir: Path) -> None:
    """SystemExit with a suggestion for an override whose key is not in the schema (typos, not additions: a
    `+key=` override adds on purpose, and config groups are Hydra's to check)."""
    groups = {p.name for p in config_dir.iterdir() if p.is_dir()}
    for arg in argv:
        key, sep, _ = arg.partition("=")
        if not sep or key.startswith(("+", "~", "hydra.", "-")) or key in groups or "/" in key:
            continue
        if key.split(".")[0] in groups and key.count(".") == 0:
            continue
        problem = unknown_key(key)
        if problem is not None:
            raise SystemExit(f"moba-train: {problem}; `moba-train --help` lists the common keys, "
                             f"moba_train/config/run.py all of them")


__all__ = ["check_overrides", "help_text", "recipe_from_file", "unknown_key"]
