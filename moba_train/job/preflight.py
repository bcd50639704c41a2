"""Everything about a run that can fail, checked for every stage before the first step.

`preflight` runs before any weight is loaded: process counts, every stage's data sources, the model's
files and its architecture (read from its config alone) against every stage's sequence parallelism and
attention plan. `check_stage_data` runs once the tokenizer is there, still before the first step: it
tokenizes (or finds cached) every stage's sources and makes sure each evaluating stage has held-out
documents to validate on. So a problem of the last stage fails before the first stage trains, not
hours later, each as one line that names the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moba_train.config import RunConfig
from moba_train.data import DataError
from moba_train.data import check_stage_data as check_stage_data_config
from moba_train.data.embedded import lee_path
from moba_train.errors import UserError
from moba_train.schema import ConfigError


def preflight(cfg: RunConfig, world: int) -> None:
    """UserError naming the stage and the fix; reads only file metadata and the model's config."""
    for stage in cfg.stages:
        sp = stage.sequence_parallel
        if world % sp:
            raise ConfigError(f"{stage.where}: sequence_parallel={sp} must divide the {world} processes; launch a "
                              f"multiple of {sp} or change stages[{stage.index}].sequence_parallel")
        check_stage_data_config(cfg.data, stage.data, seq_len=stage.seq_len, mode=stage.mode, where=stage.where)
    if cfg.eval.passkey.enabled and "lee" in cfg.eval.passkey.haystacks and any(s.eval for s in cfg.stages):
        try:
            lee_path()                                        # passkey haystacks are cut from the Lee articles
        except DataError as e:
            raise ConfigError(f"eval.passkey needs its haystack text: {e}; or set eval.passkey.enabled=false") from None
    check_architecture(cfg, model_config(cfg))


def model_config(cfg: RunConfig):
    """The model's transformers config, from its files alone (no weights); UserError when they are not here."""
    from transformers import AutoConfig

    from moba_train.models.loading import embedded_gguf_path

    m = cfg.model
    if m.source == "config":
        spec = dict(m.config)
        if "model_type" not in spec:
            raise ConfigError("model.config needs model_type (e.g. llama, qwen2) besides the architecture's fields")
        try:
            return AutoConfig.for_model(spec.pop("model_type"), **spec)
        except Exception as e:             # noqa: BLE001 - transformers' validators raise their own error types
            cause = getattr(e, "__cause__", None) or e
            raise ConfigError(f"model.config is not a valid transformers config: {cause}") from None
    if m.source == "hf":
        path = Path(m.path).expanduser()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "is not a Hugging Face model directory (no config.json)"
            raise ConfigError(f"model.path={m.path} {what}; give the local directory of the model (nothing is "
                              f"downloaded), e.g. model.path=/models/Llama-3.1-8B")
        return AutoConfig.from_pretrained(path, local_files_only=True)
    if m.source == "gguf":
        path = Path(m.path).expanduser()
        if not path.is_file() or path.suffix != ".gguf":
            raise ConfigError(f"model.path={m.path} is not a .gguf file; give the path of the model's GGUF file")
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    try:
        gguf = embedded_gguf_path(m.name)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.name={m.name}: {e}") from None
    converted = Path(cfg.paths.cache_dir).expanduser() / "models" / m.name
    if (converted / "config.json").is_file():
        return AutoConfig.from_pretrained(converted, local_files_only=True)
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def check_architecture(cfg: RunConfig, config) -> None:
    """Every stage's sequence parallelism against the heads, its attention plan against the layers, and the
    backends its plan names against this machine, the model's dtype and its head size."""
    from moba_train.distributed.ulysses import kv_replication
    from moba_train.models import AttentionPlan
    from moba_train.models.attention import backend_choices
    from moba_train.models.hf_compat import head_dim_of

    from .model_setup import model_dtype, on_gpu

    device = torch.device("cuda" if on_gpu() else "cpu")      # the type is what the backends depend on
    dtype, head_dim = model_dtype(cfg), head_dim_of(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for stage in cfg.stages:
        try:
            kv_replication(stage.sequence_parallel, heads, kv_heads)
        except ValueError as e:
            raise ConfigError(f"{stage.where}: {e} (the model has {heads} query heads); change "
                              f"stages[{stage.index}].sequence_parallel") from None
        try:
            plan = AttentionPlan.from_config(stage.attention, config.num_hidden_layers)
        except ValueError as e:
            raise ConfigError(f"{stage.where} attention: {e}") from None
        try:
            backend_choices(plan, device, dtype, head_dim)
        except (RuntimeError, ValueError) as e:     # a backend not installed, or not for this device/dtype/head size
            raise ConfigError(f"{stage.where} attention: {e} (the model's head_dim is {head_dim}, dtype "
                              f"{str(dtype).removeprefix('torch.')}); change stages[{stage.index}].attention or "
                              f"the run's attention block") from None
    if cfg.model.tokenizer and not cfg.model.tokenizer.startswith("embedded:") \
            and not Path(cfg.model.tokenizer).expanduser().is_dir():
        raise ConfigError(f"model.tokenizer={cfg.model.tokenizer} is not a directory; give a local tokenizer "
                          f"directory or embedded:<name> (nothing is downloaded)")


def check_stage_data(cfg: RunConfig, tokenizer) -> None:
    """Every stage's sources tokenized (or found in the cache), its training stream built, and, for a stage that
    evaluates, its held-out documents packed once: DataError naming the stage and the fix otherwise."""
    from moba_train.distributed.groups import layout

    from .stage_data import build_stream

    for stage in cfg.stages:
        lay = layout(stage.sequence_parallel)
        stream = build_stream(cfg, stage, tokenizer, lay.dp_rank, lay.dp)
        if stage.eval and cfg.trainer.eval_batches > 0:
            stream.validation_batches(max_packs=cfg.trainer.eval_batches * stage.micro_batch_size * lay.dp)


__all__ = ["check_architecture", "check_stage_data", "model_config", "preflight", "UserError"]
