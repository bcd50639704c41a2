"""Export a trained model to a Hugging Face directory that records its attention plan.

The directory is ordinary (config.json, model.safetensors, generation config, tokenizer files):
plain transformers loads the weights and ignores the extra config key. moba-train's loader reads

    config.json["moba_train"] = {"format": 1, "attention_plan": <plan config, phases form>, "progress": p,
                                 "trained_context": n}

and rebuilds the same AttentionPlan at the same progress. `max_position_embeddings` is the longest
context trained (`trained_context`, when given), and `rope_parameters` the RoPE the model has, so the
config tells plain transformers what the model was trained for. (Dynamic NTK RoPE is the exception:
transformers reads max_position_embeddings as its pretraining length, so it keeps its value.)
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch

from .attention import attention_modules
from .plan import AttentionPlan

log = logging.getLogger(__name__)

EXPORT_KEY = "moba_train"
EXPORT_FORMAT = 1


def plan_record(plan: AttentionPlan, trained_context: int | None = None) -> dict:
    record = {"format": EXPORT_FORMAT, "attention_plan": plan.to_config(), "progress": plan.progress}
    if trained_context is not None:
        record["trained_context"] = trained_context
    return record


def plan_from_record(record: Mapping, num_layers: int, where: str) -> AttentionPlan:
    if not isinstance(record, Mapping) or record.get("format") != EXPORT_FORMAT:
        got = record.get("format") if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(f"{where}: config key {EXPORT_KEY!r} has format {got!r}; this moba-train reads format "
                         f"{EXPORT_FORMAT}. Re-export the model with a matching moba-train version")
    missing = [k for k in ("attention_plan", "progress") if k not in record]
    if missing:
        raise ValueError(f"{where}: config key {EXPORT_KEY!r} lacks {missing}; re-export the model with export_model")
    config = dict(record["attention_plan"])
    # Exports written before the centroids convention was a setting were routed with fp32 block means.
    config.setdefault("centroids", "fp32")
    plan = AttentionPlan.from_config(config, num_layers)
    plan.set_progress(record["progress"])
    return plan


def staging_dir(target: Path, kind: str = "tmp") -> Path:
    """An empty sibling of `target` to write into before renaming it into place (same filesystem: atomic rename).

    Made with mkdir rather than tempfile.mkdtemp so that it gets the umask's permissions, not 0700.
    """
    path = target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`; the old target, if any, is removed only afterwards."""
    old = None
    if target.exists():
        old = staging_dir(target, "old")
        os.rename(target, old / target.name)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old)


def _readable_like_the_rest(directory: Path) -> None:
    """safetensors writes its file 0600 (it goes through mkstemp); give every file the umask's mode, as the rest."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def export_model(model: torch.nn.Module, tokenizer, path: str | os.PathLike, plan: AttentionPlan, *,
                 state_dict: Mapping | None = None, overwrite: bool = False, trained_context: int | None = None) -> Path:
    """Write `model` (+ `tokenizer`, may be None) to the HF directory `path`, recording `plan`.

    state_dict: the full weights when the model's own are partitioned (ZeRO-3); the model's otherwise.
    trained_context: the longest sequence trained, written as config.max_position_embeddings.
    The directory appears complete or not at all (written aside, then renamed).
    """
    target = Path(path).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose another path or pass overwrite=True")
    layers = len(attention_modules(model))
    if plan.num_layers != layers:
        raise ValueError(f"the plan covers {plan.num_layers} layers but the model has {layers}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    config = model.config
    length = config.max_position_embeddings
    dynamic = (getattr(config, "rope_parameters", None) or {}).get("rope_type") == "dynamic"
    try:
        setattr(config, EXPORT_KEY, plan_record(plan, trained_context))
        if trained_context is not None and not dynamic:
            config.max_position_embeddings = trained_context
        try:
            model.save_pretrained(staging, state_dict=state_dict)
        finally:
            delattr(config, EXPORT_KEY)
            config.max_position_embeddings = length
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _readable_like_the_rest(staging)
        replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("exported %s to %s with attention plan %s", type(model).__name__, target, plan.describe())
    return target


__all__ = ["export_model", "EXPORT_KEY", "EXPORT_FORMAT", "plan_record", "plan_from_record"]
