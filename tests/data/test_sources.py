"""Every source format yields the same records; the embedded corpus is fixed and real; the held-out split."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sysconfig
from collections import Counter

import numpy as np
import pytest
import torch

from moba_train.data import SourceConfig, build_stage_data, embedded
from moba_train.data.sources import read_records
from moba_train.data.skips import SkipLog
from moba_train.data.stage import holdout_mask
from moba_train.schema import ConfigError

DOCS = ["First document.\nIt has two lines.", "Second, with unicode: café ☕", "Third one."]


def records(src: SourceConfig) -> list:
    return [r for r, _ in read_records("t", src, SkipLog("t"))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(DOCS)))
    with gzip.open(d / "docs.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    (d / "dir").mkdir()
    for i, t in enumerate(DOCS):
        (d / "dir" / f"{i}.txt").write_text(t)
    (d / "paragraphs.txt").write_text("\n\n".join(DOCS))
    import datasets
    ds = datasets.Dataset.from_dict({"text": DOCS, "id": [0, 1, 2]})
    ds.to_parquet(str(d / "docs.parquet"))
    ds.save_to_disk(str(d / "saved"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(d / "saved_dict"))
    return d


@pytest.mark.parametrize("fields", [
    dict(format="jsonl", path="docs.jsonl"),
    dict(format="jsonl", path="docs.jsonl.gz"),
    dict(format="text", path="dir"),
    dict(format="text", path="dir/*.txt"),
    dict(format="text", path="paragraphs.txt", sample_by="paragraph"),
    dict(format="parquet", path="docs.parquet"),
    dict(format="parquet", path="docs.parquet", streaming=True),
    dict(format="saved", path="saved"),
    dict(format="saved", path="saved_dict", split="validation"),
], ids=lambda f: "-".join(str(v) for v in f.values()))
def test_every_format_reads_the_same_documents(files, fields):
    src = SourceConfig(**{**fields, "path": str(files / fields["path"])})
    assert records(src) == DOCS


def test_text_by_line_and_max_documents(files):
    src = SourceConfig(format="text", path=str(files / "dir" / "0.txt"), sample_by="line")
    assert records(src) == DOCS[0].split("\n")
    assert records(SourceConfig(format="jsonl", path=str(files / "docs.jsonl"), max_documents=2)) == DOCS[:2]


def test_documents_that_compress_too_well_are_counted_skips(tmp_path):
    """A generated table (one row repeated) is left out under max_compression_ratio; ordinary text is kept."""
    from moba_train.data.sources import compression_ratio

    prose = " ".join(f"word{i * 7919 % 1000}" for i in range(400))
    table = "".join(f"    ({i % 4}, 'x', 0.5),\n" for i in range(2000))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (prose, table, prose)))
    assert compression_ratio(prose) < 4 < 20 < compression_ratio(table)
    src = SourceConfig(format="jsonl", path=str(tmp_path / "docs.jsonl"), max_compression_ratio=10)
    skips = SkipLog("t")
    assert [r for r, _ in read_records("t", src, skips)] == [prose, prose]
    assert skips.counts == {"compresses more than 10x (max_compression_ratio)": 1}
    assert skips.examples[next(iter(skips.counts))] == [f"{tmp_path / 'docs.jsonl'}:2"]
    assert records(SourceConfig(format="jsonl", path=str(tmp_path / "docs.jsonl"))) == [prose, table, prose]


def test_a_compression_limit_at_or_below_one_is_refused_with_the_fix():
    from moba_train.data import parse_data_config

    with pytest.raises(ConfigError, match=r"data.sources.code.max_compression_ratio must be > 1 or null"):
        parse_data_config({"sources": {"code": {"format": "python_stdlib", "max_compression_ratio": 1}}})


def test_hub_without_network_names_the_source_and_the_way_out(tmp_path):
    src = SourceConfig(format="hub", hub="nobody/no-such-dataset-xyz")
    with pytest.raises(Exception, match="local copy"):
        records(src)


def test_stdlib_corpus_is_the_sorted_standard_library():
    files = embedded.stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    rel = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
    assert rel == sorted(rel) and len(rel) > 500 and "os.py" in rel and "json/decoder.py" in rel
    assert not any(r.startswith(("site-packages/", "dist-packages/")) for r in rel)
    assert embedded.stdlib_files() == files


def test_lee_corpus_is_300_real_articles():
    articles = embedded.lee_articles()
    assert len(articles) == 300 and articles[0].startswith("Hundreds of people have been forced to vacate")
    convs = records(SourceConfig(format="lee_sft"))
    assert len(convs) == 300 and all(any(m["role"] == "assistant" for m in c) for c in convs)


def test_missing_gensim_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps gensim"):
        build_stage_data({"sources": {"lee": {"format": "lee_corpus"}}}, {}, None, seq_len=64, micro_batch_size=1,
                         mode="pretrain", seed=0, cache_dir="/nonexistent")


def test_holdout_split_is_fixed_seed_free_and_nested():
    small, large = holdout_mask(10_000, 0.02), holdout_mask(10_000, 0.1)
    assert abs(small.mean() - 0.02) < 0.005 and abs(large.mean() - 0.1) < 0.01
    assert np.all(large[small]), "a larger fraction holds out a superset"
    assert np.array_equal(holdout_mask(300, 0.1), holdout_mask(1000, 0.1)[:300])   # by index, not by count
    assert not holdout_mask(100, 0.0).any()


def test_lee_and_lee_sft_hold_out_the_same_articles(lee_bpe, tmp_path):
    data = {"num_proc": 1}
    kw = dict(seq_len=512, micro_batch_size=1, seed=0, cache_dir=str(tmp_path))
    text = build_stage_data(data, {"mix": {"lee": 1}}, lee_bpe, mode="pretrain", **kw)
    sft = build_stage_data(data, {"mix": {"lee_sft": 1}}, lee_bpe, mode="sft", **kw)
    assert np.array_equal(text.heldout_docs["lee"], sft.heldout_docs["lee_sft"])
    assert 15 <= len(text.heldout_docs["lee"]) <= 45


def test_validation_batches_are_the_held_out_documents(lee_bpe, tmp_path):
    stage = build_stage_data({"num_proc": 1}, {"mix": {"lee": 1}}, lee_bpe, seq_len=256, micro_batch_size=2,
                             mode="pretrain", seed=0, cache_dir=str(tmp_path))
    src = stage.sources["lee"]
    held = np.concatenate([src.tokens[src.offsets[d]:src.offsets[d + 1]] for d in stage.heldout_docs["lee"]])
    batches = stage.validation_batches(seq_len=512)
    assert all(b["input_ids"].shape == (2, 512) for b in batches)
    # the held-out tokens, each once, and padding in the rest
    flat = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches])
    slots = len(batches) * 2 * 512
    expected = Counter(held.tolist()) + Counter({stage.pad_id: slots - len(held)})
    assert Counter(flat.tolist()) == expected and 0 < slots - len(held) < 2 * 512 + 512
    again = stage.validation_batches(seq_len=512)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, batches))


@pytest.mark.parametrize("dp_size", [2, 3])
def test_validation_batches_give_every_rank_the_same_count(lee_bpe, tmp_path, dp_size):
    kw = dict(seq_len=256, micro_batch_size=1, mode="pretrain", seed=0, cache_dir=str(tmp_path), dp_size=dp_size)
    per_rank = [build_stage_data({"num_proc": 1}, {"mix": {"lee": 1}}, lee_bpe, dp_rank=r, **kw)
                .validation_batches(max_packs=7) for r in range(dp_size)]
    assert len({len(b) for b in per_rank}) == 1
    real = sum(int((b["shift_labels"] != -100).any()) for batches in per_rank for b in batches)
    assert real == 7


def test_stdlib_source_is_the_files_in_sorted_order(lee_bpe, tmp_path):
    data = {"num_proc": 1, "sources": {"stdlib": {"format": "python_stdlib", "max_documents": 12,
                                                  "holdout_fraction": 0.0}}}
    stage = build_stage_data(data, {}, lee_bpe, seq_len=512, micro_batch_size=1, mode="pretrain", seed=0,
                             cache_dir=str(tmp_path))
    texts = []
    for path in embedded.stdlib_files():
        raw = open(path, "rb").read()
        if raw:
            texts.append(raw.decode("utf-8"))
        if len(texts) == 12:
            break
    src = stage.sources["stdlib"]
    assert src.n_docs == 12
    for d, text in enumerate(texts):
        assert src.tokens[src.offsets[d]:src.offsets[d + 1]].tolist() == lee_bpe(text)["input_ids"] + [lee_bpe.eos_token_id]


def test_python_sources_are_the_stdlib_then_the_installed_libraries():
    import torch

    files = embedded.python_source_files()
    stdlib = embedded.stdlib_files()
    assert files[: len(stdlib)] == stdlib
    installed = files[len(stdlib):]
    assert os.path.realpath(torch.__file__) in {os.path.realpath(f) for f in installed}
    assert all(f.endswith(".py") for f in installed) and len(set(files)) == len(files)


def test_python_sources_take_no_path():
    from moba_train.data.sources import FORMATS

    with pytest.raises(ConfigError, match="built in and takes no"):
        FORMATS["python_sources"].check(SourceConfig(format="python_sources", path="/tmp"), "data.sources.code")
