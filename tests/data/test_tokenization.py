"""Tokenization against the tokenizer's own call, the on-disk cache and its key, and the process pool."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest

from moba_train.data import DataConfig, SourceConfig, embedded
from moba_train.data import cache as cache_module
from moba_train.data import tokenization
from moba_train.data.cache import open_source

CODE = 'def f(x):\n    """Doc."""\n    return {"a": x ** 2}  # café\n\n\tprint(f(3))\n'


def jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def source(path, **kw):
    return SourceConfig(format="jsonl", path=path, **kw)


@pytest.mark.parametrize("tok_name", ["lee_bpe", "smollm2"])
def test_tokens_equal_the_tokenizers_own_call_plus_eos(tok_name, request, tmp_path):
    tok = request.getfixturevalue(tok_name)
    texts = embedded.lee_articles()[:20] + [CODE, "  leading and trailing spaces  ", "ünïcödé ☕ 日本語"]
    src = open_source("t", source(jsonl(tmp_path / "d.jsonl", texts)), tok, DataConfig(num_proc=1), str(tmp_path / "c"))
    assert src.n_docs == len(texts)
    for d, text in enumerate(texts):
        expected = tok(text)["input_ids"] + [tok.eos_token_id]
        assert src.tokens[src.offsets[d]:src.offsets[d + 1]].tolist() == expected
    assert src.tokens.dtype == np.uint16


def test_process_pool_equals_one_process(lee_bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenization, "BATCH_RECORDS", 7)     # many batches in flight, results kept in order
    path = jsonl(tmp_path / "d.jsonl", embedded.lee_articles())
    one = open_source("t", source(path), lee_bpe, DataConfig(num_proc=1), str(tmp_path / "one"))
    two = open_source("t", source(path), lee_bpe, DataConfig(num_proc=2), str(tmp_path / "two"))
    assert np.array_equal(one.tokens, two.tokens) and np.array_equal(one.offsets, two.offsets)


def test_second_run_reads_the_cache_without_tokenizing(lee_bpe, tmp_path, monkeypatch):
    path = jsonl(tmp_path / "d.jsonl", embedded.lee_articles()[:50])
    first = open_source("t", source(path), lee_bpe, DataConfig(num_proc=1), str(tmp_path / "c"))

    def no_tokenizing(*a, **k):
        raise AssertionError("the cache was not used")
    monkeypatch.setattr(cache_module, "tokenize_records", no_tokenizing)
    second = open_source("t", source(path, holdout_fraction=0.5), lee_bpe, DataConfig(num_proc=2), str(tmp_path / "c"))
    assert second.directory == first.directory and np.array_equal(first.tokens, second.tokens)
    assert isinstance(second.tokens, np.memmap)


def test_cache_key_follows_data_tokenizer_and_settings(lee_bpe, smollm2, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", embedded.lee_articles()[:10])
    cache = str(tmp_path / "c")
    base = open_source("t", source(path), lee_bpe, DataConfig(num_proc=1), cache).directory
    other_tok = open_source("t", source(path), smollm2, DataConfig(num_proc=1), cache).directory
    no_eos = open_source("t", source(path), lee_bpe, DataConfig(num_proc=1, append_eos=False), cache)
    assert len({base, other_tok, no_eos.directory}) == 3
    assert no_eos.offsets[-1] == open_source("t", source(path), lee_bpe, DataConfig(num_proc=1), cache).offsets[-1] - 10
    filtered = open_source("t", source(path, max_compression_ratio=50.0), lee_bpe, DataConfig(num_proc=1), cache)
    assert filtered.directory != base                     # a filter that is set is part of the key ...
    assert "max_compression_ratio" not in cache_module.source_key_fields(source(path))   # ... unset, caches made
    assert set(cache_module.source_key_fields(source(path, max_compression_ratio=50.0))) == (  # before it stay valid
        set(cache_module.source_key_fields(source(path))) | {"max_compression_ratio"})
    jsonl(tmp_path / "d.jsonl", embedded.lee_articles()[:11])       # the data changed
    changed = open_source("t", source(path), lee_bpe, DataConfig(num_proc=1), cache)
    assert changed.directory != base and changed.n_docs == 11


def _build_in_child(tok, path, cache, queue, builds_log):
    real_build = cache_module._build

    def counted_build(*args):
        with open(builds_log, "a") as f:
            f.write("built\n")
        real_build(*args)
    cache_module._build = counted_build      # in this forked child only
    queue.put(open_source("t", source(path), tok, DataConfig(num_proc=1), cache).directory)


def test_concurrent_ranks_build_one_cache(lee_bpe, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", embedded.lee_articles())
    cache, builds_log = str(tmp_path / "c"), tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(lee_bpe, path, cache, queue, builds_log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    dirs = {queue.get(timeout=5) for _ in procs}
    assert len(dirs) == 1 and builds_log.read_text() == "built\n"
    name = os.path.basename(dirs.pop())
    assert sorted(os.listdir(cache)) == sorted([name, f".{name}.lock"])    # no temporary directory left behind


def test_one_process_leaves_the_callers_environment_alone(lee_bpe, tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    path = jsonl(tmp_path / "d.jsonl", embedded.lee_articles()[:5])
    open_source("t", source(path), lee_bpe, DataConfig(num_proc=1), str(tmp_path / "c"))
    assert "TOKENIZERS_PARALLELISM" not in os.environ
