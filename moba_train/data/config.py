"""Schemas of the `data:` config group (sources, tokenization) and of a stage's `data:` mix.

Both are plain dataclasses read with `moba_train.schema.from_dict`, so an unknown key, a wrong type
or a bad value fails with its config path before anything is read or tokenized. They use only types
OmegaConf accepts (no Literal), so they also serve as Hydra structured configs.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from typing import Any

from moba_train.schema import ConfigError, from_dict


SAMPLE_BY = ("document", "line", "paragraph")
OVERFLOW = ("split", "drop")


@dataclass
class SourceConfig:
    """One named corpus. Which fields apply depends on `format` (see docs/data.md)."""

    format: str                                  # a key of moba_train.data.sources.FORMATS
    path: str | None = None                      # jsonl/text/parquet: a file, directory or glob; saved: a directory
    hub: str | None = None                       # format hub: a dataset name on the Hugging Face Hub
    subset: str | None = None                    # format hub: the dataset's config name
    split: str = "train"                         # parquet/saved/hub: the datasets split
    text_field: str = "text"                     # text records: the field holding the document
    messages_field: str | None = None            # chat records: a list of {role, content}
    prompt_field: str | None = None              # instruction records: the user's prompt ...
    response_field: str | None = None            # ... and the assistant's answer
    sample_by: str = "document"                  # format text: what one document is: document | line | paragraph
    streaming: bool = False                      # parquet/hub: read without materializing an Arrow copy
    max_documents: int | None = None             # stop reading after this many usable documents
    max_compression_ratio: float | None = None   # skip text documents zlib shrinks more than this (generated
                                                 # tables, data dumps: code is ~4-6x, such files 10-25x)
    holdout_fraction: float = 0.02               # documents held out for validation (by index, seed-free)


def embedded_sources() -> dict[str, SourceConfig]:
    """The default corpus: no network, no download (docs/data.md, "The embedded corpus")."""
    return {
        "stdlib": SourceConfig(format="python_stdlib"),
        "lee": SourceConfig(format="lee_corpus", holdout_fraction=0.1),
        "lee_sft": SourceConfig(format="lee_sft", holdout_fraction=0.1),   # same held-out articles as `lee`
    }


@dataclass
class DataConfig:
    """The run's `data:` group: every source a stage may mix, and how documents become tokens."""

    sources: dict[str, SourceConfig] = field(default_factory=embedded_sources)
    num_proc: int | None = None       # tokenization processes; None: the CPUs this process may use
    append_eos: bool = True           # end each pretraining document with the tokenizer's EOS token
    chat_template: str | None = None  # None: the tokenizer's own (the plain template if it has none);
                                      # "plain": always the plain template; else a Jinja template string
    lookahead: int = 16               # queued documents the packer searches for one that fits a pack's tail


@dataclass
class StageDataConfig:
    """A stage's `data:` block: which sources it mixes, in what shares, and what happens to long documents."""

    mix: dict[str, float] = field(default_factory=dict)   # source -> share of the stage's tokens; {}: natural
    overflow: str = "split"               # documents longer than the stage's seq_len: split | drop
    long_doc_min_tokens: int = 0          # a document this long or longer counts as long
    long_doc_share: float | None = None   # share of each source's tokens drawn from its long documents;
                                          # None: whatever share they have naturally


def parse_data_config(raw: Any, where: str = "data", used: list[str] | None = None) -> DataConfig:
    """A `data:` mapping (or a DataConfig) to a validated DataConfig. Sources outside `used` (None: all)
    are checked for their schema only, so an unused source need not exist on this machine."""
    cfg = raw if isinstance(raw, DataConfig) else from_dict(DataConfig, _plain(raw), where)
    check_data_config(cfg, where, used)
    return cfg


def parse_stage_data_config(raw: Any, where: str = "stage.data") -> StageDataConfig:
    """A stage's `data:` mapping (or a StageDataConfig) to a validated StageDataConfig."""
    cfg = raw if isinstance(raw, StageDataConfig) else from_dict(StageDataConfig, _plain(raw), where)
    check_stage_data_config(cfg, where)
    return cfg


def _plain(raw: Any) -> Any:
    try:   # a composed Hydra config arrives as a DictConfig
        from omegaconf import DictConfig, OmegaConf
    except ImportError:
        return raw
    return OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else raw


def check_data_config(cfg: DataConfig, where: str = "data", used: list[str] | None = None) -> None:
    from moba_train.data.sources import FORMATS   # the registry lives with the readers

    if not cfg.sources:
        raise ConfigError(f"{where}.sources is empty; name at least one source (docs/data.md lists the formats)")
    for name, src in cfg.sources.items():
        at = f"{where}.sources.{name}"
        if src.format not in FORMATS:
            raise ConfigError(f"{at}.format: unknown format {src.format!r}; choose one of {sorted(FORMATS)}")
        if used is None or name in used:
            FORMATS[src.format].check(src, at)
        if src.sample_by not in SAMPLE_BY:
            raise ConfigError(f"{at}.sample_by: {src.sample_by!r} is not one of {list(SAMPLE_BY)}")
        if not 0 <= src.holdout_fraction < 1:
            raise ConfigError(f"{at}.holdout_fraction must be in [0, 1), got {src.holdout_fraction}")
        if src.max_documents is not None and src.max_documents < 1:
            raise ConfigError(f"{at}.max_documents must be >= 1 or null, got {src.max_documents}")
        if src.max_compression_ratio is not None and src.max_compression_ratio <= 1:
            raise ConfigError(f"{at}.max_compression_ratio must be > 1 or null (keep every document), got "
                              f"{src.max_compression_ratio}; ordinary code and prose compress 3-6x")
        if (src.prompt_field is None) != (src.response_field is None):
            raise ConfigError(f"{at}: instruction records need both prompt_field and response_field")
        if src.messages_field is not None and src.prompt_field is not None:
            raise ConfigError(f"{at}: give messages_field (chat records) or prompt_field/response_field "
                              f"(instruction records), not both")
    if cfg.num_proc is not None and cfg.num_proc < 1:
        raise ConfigError(f"{where}.num_proc must be >= 1 or null (all CPUs), got {cfg.num_proc}")
    if cfg.lookahead < 0:
        raise ConfigError(f"{where}.lookahead must be >= 0, got {cfg.lookahead}")


def check_stage_data_config(cfg: StageDataConfig, where: str = "stage.data") -> None:
    if cfg.overflow not in OVERFLOW:
        raise ConfigError(f"{where}.overflow: {cfg.overflow!r} is not one of {list(OVERFLOW)}")
    for name, share in cfg.mix.items():
        if not (share > 0 and math.isfinite(share)):
            raise ConfigError(f"{where}.mix.{name} must be a positive share, got {share}; remove the source to leave it out")
    if cfg.long_doc_share is not None:
        if not 0 <= cfg.long_doc_share <= 1:
            raise ConfigError(f"{where}.long_doc_share must be in [0, 1] or null, got {cfg.long_doc_share}")
        if cfg.long_doc_min_tokens < 2:
            raise ConfigError(f"{where}.long_doc_share needs long_doc_min_tokens >= 2 (what counts as long), "
                              f"got {cfg.long_doc_min_tokens}")
    if cfg.long_doc_min_tokens < 0:
        raise ConfigError(f"{where}.long_doc_min_tokens must be >= 0, got {cfg.long_doc_min_tokens}")


def check_stage_against_sources(stage: StageDataConfig, data: DataConfig, seq_len: int, where: str) -> None:
    """Cross-checks that need both configs and the stage length; run before any tokenization."""
    unknown = sorted(set(stage.mix) - set(data.sources))
    if unknown:
        raise ConfigError(f"{where}.mix names source(s) {unknown} that data.sources does not define; "
                          f"defined: {sorted(data.sources)}")
    if seq_len < 2:
        raise ConfigError(f"{where}: seq_len must be >= 2 (a pack needs a token and its target), got {seq_len}")
    if stage.long_doc_share is not None and stage.long_doc_min_tokens > seq_len:
        raise ConfigError(f"{where}.long_doc_min_tokens={stage.long_doc_min_tokens} exceeds the stage's seq_len "
                          f"{seq_len}; long documents are counted by their length up to one pack, so use <= {seq_len}")


def expand_files(path: str, extensions: tuple[str, ...], at: str) -> list[str]:
    """A file, a directory (recursively, by extension) or a glob, as a sorted list; raise if nothing matches."""
    path = os.path.expanduser(path)
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise ConfigError(f"{at}.path: the glob {path!r} matches no file; fix the pattern")
        return files
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs
                       if f.endswith(extensions) and not f.startswith("."))
        if not files:
            raise ConfigError(f"{at}.path: the directory {path!r} holds no {'/'.join(extensions)} file")
        return files
    raise ConfigError(f"{at}.path: {path!r} does not exist; fix the path (relative paths start at {os.getcwd()})")
