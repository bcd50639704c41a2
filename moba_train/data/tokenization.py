"""Records to token files: batched fast-tokenizer calls in a pool of processes, written in record order.

Workers hold only the Rust `tokenizers.Tokenizer` (rebuilt from its JSON), so they start in milliseconds
and never import transformers. They run in a `WorkerPool` (one pipe per worker, no shared lock), which
is closed on success and killed on an error or Ctrl-C, so tearing it down never hangs. The main process reads and renders records and writes results in order,
with a bounded number of batches in flight so that a corpus larger than memory streams through.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from moba_train.data.sft import ChatRenderer
from moba_train.data.skips import DataError, SkipLog
from moba_train.data.worker_pool import WorkerPool

log = logging.getLogger(__name__)

MIN_DOC_TOKENS = 2            # a document needs one token and its target
BATCH_CHARS = 1 << 19         # text per worker call: large enough to amortize the IPC, small enough to stream
BATCH_RECORDS = 1024
IN_FLIGHT_PER_WORKER = 2
PROGRESS_EVERY_S = 15.0


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker needs: the tokenizer and the per-document rules."""

    tokenizer_json: str
    eos_id: int | None
    append_eos: bool


_WORKER: dict = {}
PARALLELISM_VAR = "TOKENIZERS_PARALLELISM"


@contextmanager
def _one_thread():
    """num_proc=1 runs in this process on one core: no Rayon threads while tokenizing, then as before."""
    before = os.environ.get(PARALLELISM_VAR)
    os.environ[PARALLELISM_VAR] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PARALLELISM_VAR]
        else:
            os.environ[PARALLELISM_VAR] = before


def _init_worker(spec: EncoderSpec) -> None:
    os.environ[PARALLELISM_VAR] = "false"   # the pool is the parallelism: no Rayon threads in the workers
    from tokenizers import Tokenizer
    _WORKER["tokenizer"] = Tokenizer.from_str(spec.tokenizer_json)
    _WORKER["spec"] = spec


def encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents to (flat token ids, per-document lengths); a too-short document gets length 0 and no ids."""
    spec: EncoderSpec = _WORKER["spec"]
    encodings = _WORKER["tokenizer"].encode_batch_fast(texts, add_special_tokens=True)
    eos = [spec.eos_id] if spec.append_eos and spec.eos_id is not None else []
    docs = []
    for e in encodings:
        ids = e.ids
        if eos and (not ids or ids[-1] != spec.eos_id):
            ids = ids + eos
        docs.append(ids if len(ids) >= MIN_DOC_TOKENS else [])
    return _flatten(docs), np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))


def encode_chats(conversations: list[list[tuple[str, bool]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segmented conversations to (flat ids, lengths, flat target flags); no special tokens are added,
    the chat template writes its own."""
    texts = [text for segments in conversations for text, _ in segments]
    encodings = _WORKER["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)
    docs, flags, k = [], [], 0
    for segments in conversations:
        ids, target = [], []
        for _, is_target in segments:
            seg = encodings[k].ids
            k += 1
            ids += seg
            target += [is_target] * len(seg)
        usable = len(ids) >= MIN_DOC_TOKENS and any(target[1:])   # a target needs a token before it
        docs.append(ids if usable else [])
        flags.append(target if usable else [])
    return (_flatten(docs), np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)),
            np.fromiter((t for f in flags for t in f), dtype=np.uint8))


def _flatten(docs: list[list[int]]) -> np.ndarray:
    total = sum(map(len, docs))
    return np.fromiter((i for d in docs for i in d), dtype=np.uint32, count=total)


def _batches(records: Iterator[tuple], chat: bool, renderer: ChatRenderer | None, skips: SkipLog):
    payload, where, chars = [], [], 0
    for record, location in records:
        if chat:
            item = renderer.segments(record, skips, location)
            if item is None:
                continue
            size = sum(len(t) for t, _ in item)
        else:
            item, size = record, len(record)
        payload.append(item)
        where.append(location)
        chars += size
        if chars >= BATCH_CHARS or len(payload) >= BATCH_RECORDS:
            yield payload, where
            payload, where, chars = [], [], 0
    if payload:
        yield payload, where


def tokenize_records(records: Iterator[tuple], *, chat: bool, renderer: ChatRenderer | None, spec: EncoderSpec,
                     num_proc: int, skips: SkipLog, out_dir: str, token_dtype: np.dtype) -> dict:
    """Write tokens.bin, offsets.npy (and targets.bin for chats) into out_dir; return counts for the meta."""
    worker_fn = encode_chats if chat else encode_texts
    pool = None
    if num_proc > 1:
        pool = WorkerPool(num_proc, initializer=_init_worker, initargs=(spec,))
    else:
        from tokenizers import Tokenizer
        _WORKER.update(tokenizer=Tokenizer.from_str(spec.tokenizer_json), spec=spec)
    lengths: list[np.ndarray] = []
    n_tokens, started, last_report = 0, time.perf_counter(), time.perf_counter()
    pending: deque = deque()
    try:
        with pool if pool else _one_thread(), open(os.path.join(out_dir, "tokens.bin"), "wb") as tok_file, \
                open(os.path.join(out_dir, "targets.bin"), "wb") if chat else nullcontext() as tgt_file:

            def drain_one() -> None:
                nonlocal n_tokens, last_report
                result, where = pending.popleft()
                ids, lens, *targets = pool.result(result) if pool else result
                for i in np.flatnonzero(lens == 0):
                    skips.skip("too short (no token with a target)" if chat else f"too short (< {MIN_DOC_TOKENS} tokens)",
                               where[i])
                ids.astype(token_dtype, copy=False).tofile(tok_file)
                if chat:
                    targets[0].tofile(tgt_file)
                lengths.append(lens[lens > 0])
                n_tokens += int(ids.size)
                if time.perf_counter() - last_report > PROGRESS_EVERY_S:
                    last_report = time.perf_counter()
                    log.info("tokenizing %r: %d documents, %.1fM tokens, %.0fK tokens/s", skips.source,
                             sum(map(len, lengths)), n_tokens / 1e6, n_tokens / (last_report - started) / 1e3)

            for payload, where in _batches(records, chat, renderer, skips):
                pending.append((pool.submit(worker_fn, payload) if pool else worker_fn(payload), where))
                while len(pending) > IN_FLIGHT_PER_WORKER * max(num_proc, 1) or (not pool and pending):
                    drain_one()
            while pending:
                drain_one()
    finally:
        if pool:
            pool.kill()        # a no-op after the clean close on leaving the `with`
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if lens.size == 0:
        raise DataError(f"source {skips.source!r} has no usable documents: {skips.describe() or 'it is empty'}")
    offsets = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    np.save(os.path.join(out_dir, "offsets.npy"), offsets)
    seconds = time.perf_counter() - started
    return {"n_docs": int(lens.size), "n_tokens": int(offsets[-1]), "seconds": round(seconds, 3)}
