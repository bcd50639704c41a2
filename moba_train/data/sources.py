"""Source formats, by name: how a configured source is checked, identified for the cache, and read.

Every reader yields `(record, location)` in a fixed order, where a record is a document (str) or a
conversation (a list of {role, content}). Bad records are counted skips (`SkipLog`), never a crash.

jsonl and text files are read line by line here rather than through `datasets`' Arrow reader, so that a
line that does not parse or is not UTF-8 is one counted skip with its file:line, not a failed load.
parquet, saved datasets and the Hub go through `datasets` (imported only when such a source is read).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from moba_train.data import embedded
from moba_train.data.config import SourceConfig, expand_files
from moba_train.data.skips import DataError, SkipLog
from moba_train.schema import ConfigError

CHAT_ROLES = ("system", "user", "assistant", "tool")
OPENERS: dict[str, Callable] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass(frozen=True)
class SourceFormat:
    name: str
    check: Callable[[SourceConfig, str], None]               # raise ConfigError before any reading
    identity: Callable[[SourceConfig], Any]                  # JSON-able; changes when the data changes
    read: Callable[[SourceConfig, SkipLog], Iterator[tuple]]  # (record, location) in a fixed order
    is_chat: Callable[[SourceConfig], bool] = lambda src: src.messages_field is not None or src.prompt_field is not None


FORMATS: dict[str, SourceFormat] = {}


def register(fmt: SourceFormat) -> None:
    FORMATS[fmt.name] = fmt


def read_records(name: str, src: SourceConfig, skips: SkipLog) -> Iterator[tuple]:
    """The usable records of a source, in order, up to `max_documents`."""
    limit = src.max_compression_ratio
    for record, where in FORMATS[src.format].read(src, skips):
        if limit is not None and isinstance(record, str) and compression_ratio(record) > limit:
            skips.skip(f"compresses more than {limit:g}x (max_compression_ratio)", where)
            continue
        skips.kept += 1
        yield record, where
        if src.max_documents is not None and skips.kept >= src.max_documents:
            return


def compression_ratio(text: str) -> float:
    """Bytes over zlib-compressed bytes (level 6): how repetitive a document is."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data, 6)) if data else 1.0


def is_chat(src: SourceConfig) -> bool:
    return FORMATS[src.format].is_chat(src)


# ---------------------------------------------------------------- records from fields

def record_from_row(row: dict, src: SourceConfig, skips: SkipLog, where: str):
    """The document or conversation a row holds, or None after counting why it has none."""
    if src.messages_field is not None:
        return _conversation(row.get(src.messages_field), src.messages_field, skips, where, row)
    if src.prompt_field is not None:
        prompt, response = row.get(src.prompt_field), row.get(src.response_field)
        for field_name, value in ((src.prompt_field, prompt), (src.response_field, response)):
            if not isinstance(value, str) or not value.strip():
                _skip_field(skips, field_name, value, where, row)
                return None
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    text = row.get(src.text_field)
    if not isinstance(text, str):
        _skip_field(skips, src.text_field, text, where, row)
        return None
    return text


def _skip_field(skips: SkipLog, field_name: str, value, where: str, row: dict) -> None:
    if field_name not in row:
        skips.skip(f"no field {field_name!r}", f"{where} (fields: {', '.join(map(str, row))})")
    elif value is None:
        skips.skip(f"field {field_name!r} is null", where)
    elif isinstance(value, str):
        skips.skip(f"field {field_name!r} is empty", where)
    else:
        skips.skip(f"field {field_name!r} is not a string", f"{where} ({type(value).__name__})")


def _conversation(messages, field_name: str, skips: SkipLog, where: str, row: dict):
    if messages is None or field_name not in row:
        _skip_field(skips, field_name, messages, where, row)
        return None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        skips.skip(f"field {field_name!r} is not a list of {{role, content}} strings", where)
        return None
    roles = [m["role"] for m in messages]
    bad = sorted(set(roles) - set(CHAT_ROLES))
    if bad:
        skips.skip(f"unknown chat role(s) {bad} (allowed: {list(CHAT_ROLES)})", where)
        return None
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        skips.skip("conversation has no non-empty assistant turn", where)
        return None
    if roles[0] == "assistant":
        skips.skip("conversation starts with the assistant", where)
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------- local files (jsonl, text)

def _open_binary(path: str):
    for suffix, opener in OPENERS.items():
        if path.endswith(suffix):
            return opener(path, "rb")
    return open(path, "rb")


def _file_identity(files: list[str]) -> list:
    return [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]


def _check_files(extensions: tuple[str, ...]):
    def check(src: SourceConfig, at: str) -> None:
        if not src.path:
            raise ConfigError(f"{at}.path is required for format {src.format!r} (a file, directory or glob)")
        files = expand_files(src.path, extensions, at)
        if all(os.path.getsize(f) == 0 for f in files):
            shown = files[0] if len(files) == 1 else f"all {len(files)} files under {src.path}"
            raise ConfigError(f"{at}.path: {shown} is empty; point the source at data, or remove it from the mix")
    return check


def _non_empty_files(src: SourceConfig, extensions: tuple[str, ...], skips: SkipLog) -> Iterator[str]:
    for path in expand_files(src.path, extensions, f"data.sources.{skips.source}"):
        if os.path.getsize(path) == 0:
            skips.skip("empty file", path)
        else:
            yield path


JSONL_EXT = tuple(e + c for e in (".jsonl", ".json", ".ndjson") for c in ("", *OPENERS))
TEXT_EXT = tuple(e + c for e in (".txt", ".text", ".md") for c in ("", *OPENERS))


def read_jsonl(src: SourceConfig, skips: SkipLog) -> Iterator[tuple]:
    for path in _non_empty_files(src, JSONL_EXT, skips):
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    continue   # blank lines separate nothing in jsonl
                try:
                    line = raw.rstrip(b"\r\n").decode("utf-8")
                except UnicodeDecodeError as e:
                    skips.skip("invalid UTF-8", f"{where} (byte {e.start})")
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    skips.skip("JSON line does not parse", f"{where} ({e.msg}, column {e.colno})")
                    continue
                if not isinstance(row, dict):
                    skips.skip("JSON line is not an object", f"{where} ({type(row).__name__})")
                    continue
                record = record_from_row(row, src, skips, where)
                if record is not None:
                    yield record, where


def read_text(src: SourceConfig, skips: SkipLog, files: list[str] | None = None) -> Iterator[tuple]:
    for path in files if files is not None else _non_empty_files(src, TEXT_EXT, skips):
        with _open_binary(path) as f:
            if src.sample_by == "document":
                data = f.read()
                if not data.strip():
                    skips.skip("empty file", path)
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    skips.skip("invalid UTF-8", f"{path} (byte {e.start})")
                    continue
                yield text, path
                continue
            for number, unit in _units(f, src.sample_by):   # streamed: a file may be larger than memory
                where = f"{path}:{src.sample_by} {number}"
                try:
                    text = unit.decode("utf-8")
                except UnicodeDecodeError as e:
                    skips.skip("invalid UTF-8", f"{where} (byte {e.start})")
                    continue
                yield text, where


def _units(f, sample_by: str) -> Iterator[tuple[int, bytes]]:
    """(number, bytes) of each non-blank line, or of each paragraph (lines up to a blank line)."""
    if sample_by == "line":
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line.rstrip(b"\r\n")
        return
    paragraph, number = [], 1
    for line in f:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield number, b"".join(paragraph).rstrip(b"\r\n")
            paragraph, number = [], number + 1
    if paragraph:
        yield number, b"".join(paragraph).rstrip(b"\r\n")


def _check_text(src: SourceConfig, at: str) -> None:
    if src.messages_field or src.prompt_field:
        raise ConfigError(f"{at}: format 'text' holds plain documents; chat or instruction records need "
                          f"format jsonl, parquet, saved or hub")
    _check_files(TEXT_EXT)(src, at)


register(SourceFormat("jsonl", _check_files(JSONL_EXT),
                      lambda src: _file_identity(expand_files(src.path, JSONL_EXT, "")), read_jsonl))
register(SourceFormat("text", _check_text,
                      lambda src: _file_identity(expand_files(src.path, TEXT_EXT, "")), read_text, lambda src: False))


# ---------------------------------------------------------------- through `datasets` (parquet, saved, hub)

def _fields(src: SourceConfig) -> list[str]:
    if src.messages_field is not None:
        return [src.messages_field]
    if src.prompt_field is not None:
        return [src.prompt_field, src.response_field]
    return [src.text_field]


def read_dataset(ds, src: SourceConfig, skips: SkipLog, label: str) -> Iterator[tuple]:
    needed = _fields(src)
    columns = ds.column_names
    if columns is not None:
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"source {skips.source!r} ({label}) has no column(s) {missing}; its columns are "
                            f"{columns}: set data.sources.{skips.source}.text_field (or messages_field / "
                            f"prompt_field + response_field) to one of them")
        ds = ds.select_columns(needed)
    row_index = 0
    for batch in ds.iter(batch_size=1024):
        n = len(next(iter(batch.values())))
        for i in range(n):
            row = {k: v[i] for k, v in batch.items()}
            record = record_from_row(row, src, skips, f"{label} row {row_index}")
            row_index += 1
            if record is not None:
                yield record, f"{label} row {row_index - 1}"


def _load_dataset(*args, where: str, **kwargs):
    import datasets   # 4.5 s to import: only when a datasets-backed source is actually read
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:   # datasets raises many types; name the source and the way out
        raise DataError(f"{where}: datasets.load_dataset{args} failed: {type(e).__name__}: {e}") from e


def read_parquet(src: SourceConfig, skips: SkipLog) -> Iterator[tuple]:
    files = expand_files(src.path, (".parquet",), f"data.sources.{skips.source}")
    ds = _load_dataset("parquet", data_files=files, split="train", streaming=src.streaming,
                       where=f"source {skips.source!r}")
    yield from read_dataset(ds, src, skips, src.path)


def read_saved(src: SourceConfig, skips: SkipLog) -> Iterator[tuple]:
    import datasets
    ds = datasets.load_from_disk(os.path.expanduser(src.path))
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise DataError(f"source {skips.source!r}: the saved dataset {src.path} has splits {list(ds)}, "
                            f"not {src.split!r}; set data.sources.{skips.source}.split")
        ds = ds[src.split]
    yield from read_dataset(ds, src, skips, f"{src.path}[{src.split}]")


def read_hub(src: SourceConfig, skips: SkipLog) -> Iterator[tuple]:
    ds = _load_dataset(src.hub, src.subset, split=src.split, streaming=src.streaming,
                       where=f"source {skips.source!r} (hub: {src.hub}; without network, download it once and "
                             f"point a parquet/jsonl/saved source at the local copy)")
    yield from read_dataset(ds, src, skips, f"{src.hub}[{src.split}]")


def _check_saved(src: SourceConfig, at: str) -> None:
    if not src.path:
        raise ConfigError(f"{at}.path is required for format 'saved' (a directory written by Dataset.save_to_disk)")
    path = os.path.expanduser(src.path)
    if not os.path.isdir(path):
        raise ConfigError(f"{at}.path: {path!r} is not a directory; format 'saved' reads Dataset.save_to_disk output")
    if not any(os.path.exists(os.path.join(path, m)) for m in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise ConfigError(f"{at}.path: {path!r} holds no saved dataset (no state.json or dataset_dict.json); "
                          f"use format parquet/jsonl for raw files")


def _check_hub(src: SourceConfig, at: str) -> None:
    if not src.hub:
        raise ConfigError(f"{at}.hub is required for format 'hub' (a dataset name such as 'roneneldan/TinyStories')")


def _dir_identity(path: str) -> list:
    path = os.path.expanduser(path)
    return sorted([os.path.relpath(os.path.join(dp, f), path), os.path.getsize(os.path.join(dp, f)),
                   os.stat(os.path.join(dp, f)).st_mtime_ns] for dp, _, fs in os.walk(path) for f in fs)


register(SourceFormat("parquet", _check_files((".parquet",)),
                      lambda src: _file_identity(expand_files(src.path, (".parquet",), "")), read_parquet))
register(SourceFormat("saved", _check_saved, lambda src: _dir_identity(src.path), read_saved))
register(SourceFormat("hub", _check_hub, lambda src: [src.hub, src.subset, src.split], read_hub))


# ---------------------------------------------------------------- the embedded corpus

def _check_embedded(src: SourceConfig, at: str) -> None:
    set_fields = [f for f in ("path", "hub", "messages_field", "prompt_field") if getattr(src, f) is not None]
    if set_fields:
        raise ConfigError(f"{at}: format {src.format!r} is built in and takes no {set_fields}; remove them")
    if src.format not in ("python_stdlib", "python_sources"):
        try:
            embedded.lee_path()
        except DataError as e:
            raise ConfigError(f"{at}: {e}") from None


def read_stdlib(src: SourceConfig, skips: SkipLog) -> Iterator[tuple]:
    return read_text(SourceConfig(format="text", sample_by="document"), skips, embedded.stdlib_files())


def read_python_sources(src: SourceConfig, skips: SkipLog) -> Iterator[tuple]:
    return read_text(SourceConfig(format="text", sample_by="document"), skips, embedded.python_source_files())


def read_lee(src: SourceConfig, skips: SkipLog) -> Iterator[tuple]:
    for i, article in enumerate(embedded.lee_articles()):
        yield article, f"lee_background.cor:article {i}"


def read_lee_sft(src: SourceConfig, skips: SkipLog) -> Iterator[tuple]:
    for i, article in enumerate(embedded.lee_articles()):
        yield embedded.lee_sft_conversation(i, article), f"lee_background.cor:article {i}"


register(SourceFormat("python_stdlib", _check_embedded,
                      lambda src: [embedded.stdlib_root(), _file_identity(embedded.stdlib_files())],
                      read_stdlib, lambda src: False))
register(SourceFormat("python_sources", _check_embedded,
                      lambda src: [embedded.stdlib_root(), embedded.site_packages_roots(),
                                   _file_identity(embedded.python_source_files())],
                      read_python_sources, lambda src: False))
register(SourceFormat("lee_corpus", _check_embedded, lambda src: _file_identity([embedded.lee_path()]),
                      read_lee, lambda src: False))
register(SourceFormat("lee_sft", _check_embedded,
                      lambda src: [_file_identity([embedded.lee_path()]), embedded.LEE_SFT_VERSION],
                      read_lee_sft, lambda src: True))
