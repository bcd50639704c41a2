"""Load the configured model for training or evaluation: weights, tokenizer, dtype and the memory knobs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moba_train.models import LoadedModel, load_embedded, load_gguf, load_hf_dir, build_from_config
from moba_train.models.hf_compat import enable_activation_checkpointing
from moba_train.models.tiled_mlp import tile_mlps

from moba_train.config import RunConfig

log = logging.getLogger(__name__)


def on_gpu() -> bool:
    return torch.cuda.is_available()


def compute_device() -> torch.device:
    """Where this process computes: its current GPU (the engine sets it from LOCAL_RANK) or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def model_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if on_gpu() else torch.float32   # bf16 matmuls are ~150x slower on AVX2 CPUs
    return getattr(torch, cfg.model.dtype)


def _embedded(cfg: RunConfig, name: str, dtype) -> LoadedModel:
    return load_embedded(name, dtype=dtype, cache_dir=Path(cfg.paths.cache_dir).expanduser() / "models" / name)


def load_tokenizer(cfg: RunConfig, spec: str):
    """`embedded:<name>` (the embedded model's tokenizer) or a local tokenizer directory."""
    if spec.startswith("embedded:"):
        return _embedded(cfg, spec.split(":", 1)[1], "float32").tokenizer
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(f"model.tokenizer={spec!r} is not a directory; give a local tokenizer directory or "
                         f"embedded:<name> (nothing is downloaded)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_for_training(cfg: RunConfig) -> LoadedModel:
    m = cfg.model
    dtype = model_dtype(cfg)
    if m.source == "embedded":
        loaded = _embedded(cfg, m.name, dtype)
    elif m.source == "hf":
        loaded = load_hf_dir(m.path, dtype=dtype)
    elif m.source == "gguf":
        loaded = load_gguf(m.path, dtype=dtype)
    else:
        loaded = LoadedModel(build_from_config(m.config, dtype=dtype, seed=cfg.trainer.seed), None, None)
    if m.tokenizer is not None:
        loaded.tokenizer = load_tokenizer(cfg, m.tokenizer)
    if loaded.tokenizer is None:
        raise ValueError("the model has no tokenizer; set model.tokenizer to a local tokenizer directory or "
                         "embedded:<name>")
    model = loaded.model
    model.train()
    model.config.use_cache = False
    apply_activation_checkpointing(model, m)
    if m.tiled_mlp_chunks > 1:
        tile_mlps(model, m.tiled_mlp_chunks)
    return loaded


def apply_activation_checkpointing(model, m) -> None:
    """model.activation_checkpointing / offload_activations / checkpoint_every_n_layers on a loaded model."""
    if m.offload_activations and not m.activation_checkpointing:
        raise ValueError("model.offload_activations moves the checkpointed layer inputs to CPU memory: it needs "
                         "model.activation_checkpointing=true")
    if m.checkpoint_every_n_layers < 1:
        raise ValueError(f"model.checkpoint_every_n_layers must be >= 1 (1: every layer), got {m.checkpoint_every_n_layers}")
    if m.activation_checkpointing:
        enable_activation_checkpointing(model, m.checkpoint_every_n_layers, m.offload_activations)
