"""Every bad-data case of issue 4: a clear error before training starts, or a counted skip in the summary."""

from __future__ import annotations

import json
import os

import pytest

from moba_train.data import DataError, build_stage_data
from moba_train.schema import ConfigError

GOOD = ["A good document with enough words to tokenize.", "Another good one, also fine."]


def build(tok, tmp_path, source: dict, stage: dict | None = None, seq_len=128, mode="pretrain"):
    data = {"num_proc": 1, "sources": {"s": {"holdout_fraction": 0.0, **source}}}
    return build_stage_data(data, stage or {"mix": {"s": 1}}, tok, seq_len=seq_len, micro_batch_size=1, mode=mode,
                            seed=0, cache_dir=str(tmp_path / "cache"))


def lines(path, *rows: bytes):
    path.write_bytes(b"".join(r + b"\n" for r in rows))
    return str(path)


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def test_missing_file_fails_before_any_work(lee_bpe, tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources.s.path: '.*nope.jsonl' does not exist"):
        build(lee_bpe, tmp_path, {"format": "jsonl", "path": str(tmp_path / "nope.jsonl")})
    assert not (tmp_path / "cache").exists()


def test_empty_file_alone_is_an_error(lee_bpe, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty.jsonl is empty"):
        build(lee_bpe, tmp_path, {"format": "jsonl", "path": str(tmp_path / "empty.jsonl")})


def test_empty_file_among_others_is_a_counted_skip(lee_bpe, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(GOOD[0])
    (tmp_path / "d" / "b.txt").write_text("")
    stage = build(lee_bpe, tmp_path, {"format": "text", "path": str(tmp_path / "d")})
    assert "1 x empty file" in stage.report() and "b.txt" in stage.report()


def test_record_without_the_text_field_is_a_counted_skip(lee_bpe, tmp_path):
    path = lines(tmp_path / "d.jsonl", j({"text": GOOD[0]}), j({"content": "x", "id": 3}), j({"text": None}),
                 j({"text": 5}), j({"text": GOOD[1]}))
    report = build(lee_bpe, tmp_path, {"format": "jsonl", "path": path}).report()
    assert "1 x no field 'text' (e.g. " in report and "d.jsonl:2 (fields: content, id)" in report
    assert "1 x field 'text' is null" in report and "1 x field 'text' is not a string" in report


def test_wrong_text_field_fails_fast_with_the_fields_it_saw(lee_bpe, tmp_path):
    rows = [j({"content": f"doc {i}"}) for i in range(1200)]
    path = lines(tmp_path / "d.jsonl", *rows)
    with pytest.raises(DataError, match=r"first 1000 records were all skipped .*no field 'text'.*fields: content"):
        build(lee_bpe, tmp_path, {"format": "jsonl", "path": path})


def test_wrong_column_of_a_parquet_file_is_an_error_before_tokenizing(lee_bpe, tmp_path):
    import datasets
    datasets.Dataset.from_dict({"body": GOOD}).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\]; its columns are \['body'\]"):
        build(lee_bpe, tmp_path, {"format": "parquet", "path": str(tmp_path / "d.parquet")})


def test_invalid_utf8_is_a_counted_skip(lee_bpe, tmp_path):
    path = lines(tmp_path / "d.jsonl", j({"text": GOOD[0]}), b'{"text": "caf\xe9"}', j({"text": GOOD[1]}))
    report = build(lee_bpe, tmp_path, {"format": "jsonl", "path": path}).report()
    assert "1 x invalid UTF-8 (e.g. " in report and "d.jsonl:2 (byte 13)" in report
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "ok.txt").write_text(GOOD[0])
    (tmp_path / "t" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    report = build(lee_bpe, tmp_path, {"format": "text", "path": str(tmp_path / "t")}).report()
    assert "1 x invalid UTF-8" in report and "latin1.txt (byte 3)" in report
    lines(tmp_path / "lines.txt", GOOD[0].encode(), "caf\xe9".encode("latin-1"), GOOD[1].encode())
    stage = build(lee_bpe, tmp_path, {"format": "text", "path": str(tmp_path / "lines.txt"), "sample_by": "line"})
    assert "lines.txt:line 2 (byte 3)" in stage.report() and stage.sources["s"].n_docs == 2


def test_json_line_that_does_not_parse_is_a_counted_skip(lee_bpe, tmp_path):
    path = lines(tmp_path / "d.jsonl", j({"text": GOOD[0]}), b'{"text": "unterminated', b"[1, 2]",
                 j({"text": GOOD[1]}))
    stage = build(lee_bpe, tmp_path, {"format": "jsonl", "path": path})
    report = stage.report()
    assert "1 x JSON line does not parse" in report and "d.jsonl:2 (Unterminated string" in report
    assert "1 x JSON line is not an object" in report and stage.sources["s"].n_docs == 2


def test_documents_too_short_to_train_on_are_counted_skips(lee_bpe, tmp_path):
    path = lines(tmp_path / "d.jsonl", j({"text": GOOD[0]}), j({"text": ""}), j({"text": GOOD[1]}))
    report = build(lee_bpe, tmp_path, {"format": "jsonl", "path": path}).report()
    assert "1 x too short (< 2 tokens) (e.g. " in report and "d.jsonl:2" in report


def test_a_source_with_no_usable_document_is_an_error(lee_bpe, tmp_path):
    path = lines(tmp_path / "d.jsonl", j({"text": ""}), b"not json")
    with pytest.raises(DataError, match=r"source 's' has no usable documents: ") as error:
        build(lee_bpe, tmp_path, {"format": "jsonl", "path": path})
    assert "1 x too short" in str(error.value) and "1 x JSON line does not parse" in str(error.value)


def test_every_document_longer_than_a_pack_with_overflow_drop_is_an_error(lee_bpe, tmp_path):
    path = lines(tmp_path / "d.jsonl", j({"text": " ".join(GOOD * 20)}))
    with pytest.raises(DataError, match="every training document of source 's' is longer than seq_len 32; set overflow: split"):
        build(lee_bpe, tmp_path, {"format": "jsonl", "path": path}, {"mix": {"s": 1}, "overflow": "drop"}, seq_len=32)


def test_long_document_share_without_long_documents_is_an_error(lee_bpe, tmp_path):
    path = lines(tmp_path / "d.jsonl", *[j({"text": t}) for t in GOOD])
    stage = {"mix": {"s": 1}, "long_doc_min_tokens": 100, "long_doc_share": 0.5}
    with pytest.raises(DataError, match=r"no training document of \['s'\] reaches long_doc_min_tokens=100 \(longest: \d+"):
        build(lee_bpe, tmp_path, {"format": "jsonl", "path": path}, stage)


def test_validation_without_documents_long_enough_is_an_error(lee_bpe, tmp_path):
    path = lines(tmp_path / "d.jsonl", *[j({"text": t}) for t in GOOD * 30])
    stage = build(lee_bpe, tmp_path, {"format": "jsonl", "path": path, "holdout_fraction": 0.3})
    assert stage.validation_batches()
    with pytest.raises(DataError, match=r"of at least 5000 tokens.*lower min_doc_tokens"):
        stage.validation_batches(min_doc_tokens=5000)


def test_bad_chat_records_are_counted_skips(lee_bpe, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good, {"messages": "not a list"}, {"messages": [{"role": "robot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "x"}]}]
    path = lines(tmp_path / "c.jsonl", *[j(r) for r in rows])
    report = build(lee_bpe, tmp_path, {"format": "jsonl", "path": path, "messages_field": "messages"}, mode="sft").report()
    for reason in ("field 'messages' is not a list of {role, content} strings", "unknown chat role(s) ['robot']",
                   "conversation has no non-empty assistant turn", "conversation starts with the assistant"):
        assert f"1 x {reason}" in report


def test_slow_tokenizer_is_refused_before_reading(tmp_path):
    class SlowTokenizer:
        eos_token_id = pad_token_id = 0
    with pytest.raises(DataError, match="needs a fast"):
        build(SlowTokenizer(), tmp_path, {"format": "lee_corpus"})
    assert not os.path.exists(tmp_path / "cache")
