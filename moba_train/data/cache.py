"""The on-disk token cache of one source, keyed by (source and its files, tokenizer, settings).

Layout of `<cache_dir>/<source>-<key16>/`: `tokens.bin` (uint16 or uint32 ids, all documents back to back),
`offsets.npy` (int64, n_docs + 1), `targets.bin` (uint8, chats only: 1 on the assistant's tokens) and
`meta.json`, written last. A cache is built in a temporary directory and renamed into place under a
file lock, so concurrent ranks build it once and a crash never leaves a half-written cache behind.
A warm start reads only meta.json and offsets.npy; token files are memory-mapped.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moba_train.data import sources
from moba_train.data.config import DataConfig, SourceConfig
from moba_train.data.sft import ChatRenderer, resolve_chat_template
from moba_train.data.skips import DataError, SkipLog
from moba_train.data.tokenization import MIN_DOC_TOKENS, EncoderSpec, tokenize_records

log = logging.getLogger(__name__)

CACHE_VERSION = 1
NOT_IN_KEY = ("holdout_fraction", "streaming")   # they change neither the documents nor their tokens
# Fields added after CACHE_VERSION 1, keyed only when set: at their defaults they keep existing caches valid.
KEYED_WHEN_SET = {"max_compression_ratio": None}


@dataclass
class TokenizedSource:
    name: str
    directory: str
    chat: bool
    tokens: np.ndarray            # memory-mapped ids of every document, back to back
    offsets: np.ndarray           # document d is tokens[offsets[d]:offsets[d + 1]]
    targets: np.ndarray | None    # chats: 1 where the token is the assistant's
    meta: dict

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def skips(self) -> SkipLog:
        return SkipLog.from_dict(self.name, self.meta["skips"])


def backend_tokenizer(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"the data pipeline needs a fast (Rust `tokenizers`) tokenizer, got {type(tokenizer).__name__}; "
                        f"load it with transformers.AutoTokenizer (fast is the default) from a tokenizer.json")
    return backend


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if backend_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True) <= 1 << 16
                    else np.uint32)


def source_key_fields(src: SourceConfig) -> dict:
    """The source's settings that its cache depends on."""
    return {k: v for k, v in dataclasses.asdict(src).items()
            if k not in NOT_IN_KEY and not (k in KEYED_WHEN_SET and v == KEYED_WHEN_SET[k])}


def cache_key(name: str, src: SourceConfig, tokenizer, data: DataConfig) -> tuple[str, EncoderSpec, str | None]:
    """The key, what the workers need, and the chat template (chats only)."""
    chat = sources.is_chat(src)
    spec = EncoderSpec(tokenizer_json=backend_tokenizer(tokenizer).to_str(), eos_id=tokenizer.eos_token_id,
                       append_eos=data.append_eos and not chat)
    template = resolve_chat_template(tokenizer, data.chat_template) if chat else None
    material = {
        "version": CACHE_VERSION,
        "source": source_key_fields(src),
        "data": sources.FORMATS[src.format].identity(src),
        "tokenizer": hashlib.sha256(spec.tokenizer_json.encode()).hexdigest(),
        "eos_id": spec.eos_id,
        "append_eos": spec.append_eos,
        "chat_template": template,
        "min_doc_tokens": MIN_DOC_TOKENS,
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return key, spec, template


def open_source(name: str, src: SourceConfig, tokenizer, data: DataConfig, cache_dir: str) -> TokenizedSource:
    """The tokenized source from the cache, building the cache first if it is missing."""
    key, spec, template = cache_key(name, src, tokenizer, data)
    cache_dir = os.path.expanduser(cache_dir)
    final = os.path.join(cache_dir, f"{name}-{key[:16]}")
    if os.path.exists(os.path.join(final, "meta.json")):
        return load(final, name)
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, f".{name}-{key[:16]}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # another rank may be building this very cache: wait for it
        if not os.path.exists(os.path.join(final, "meta.json")):
            _build(name, src, tokenizer, data, key, spec, template, final)
    return load(final, name)


def _build(name, src, tokenizer, data, key, spec, template, final) -> None:
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    chat = sources.is_chat(src)
    skips = SkipLog(name)
    num_proc = data.num_proc or len(os.sched_getaffinity(0))
    dtype = token_dtype(tokenizer)
    log.info("tokenizing source %r (%s) with %d process(es) into %s", name, src.format, num_proc, final)
    try:
        counts = tokenize_records(
            sources.read_records(name, src, skips), chat=chat,
            renderer=ChatRenderer(tokenizer, template) if chat else None, spec=spec, num_proc=num_proc,
            skips=skips, out_dir=tmp, token_dtype=dtype)
        meta = {"version": CACHE_VERSION, "name": name, "key": key, "format": src.format, "chat": chat,
                "dtype": dtype.name, **counts, "skips": skips.to_dict(), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)   # an incomplete cache without meta.json
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("source %r: %d documents, %d tokens in %.1f s. %s", name, counts["n_docs"], counts["n_tokens"],
             counts["seconds"], skips.summary())


def load(directory: str, name: str) -> TokenizedSource:
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("version") != CACHE_VERSION:
        raise DataError(f"the token cache {directory} has version {meta.get('version')}, this code reads "
                        f"{CACHE_VERSION}; delete the directory to rebuild it")
    tokens = np.memmap(os.path.join(directory, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    targets = (np.memmap(os.path.join(directory, "targets.bin"), dtype=np.uint8, mode="r", shape=(meta["n_tokens"],))
               if meta["chat"] else None)
    return TokenizedSource(name=name, directory=directory, chat=meta["chat"], tokens=tokens,
                           offsets=np.load(os.path.join(directory, "offsets.npy")), targets=targets, meta=meta)
