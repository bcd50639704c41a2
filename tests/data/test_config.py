"""Config errors name the key and the fix, and all come before any reading or tokenization (tokenizer=None)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from moba_train.data import DataConfig, StageDataConfig, build_stage_data, embedded_sources, parse_data_config, parse_stage_data_config
from moba_train.schema import ConfigError


def build(data, stage, seq_len=128, mode="pretrain", **kw):
    return build_stage_data(data, stage, None, seq_len=seq_len, micro_batch_size=1, mode=mode, seed=0,
                            cache_dir="/nonexistent/never-created", **kw)


def test_defaults_are_the_embedded_corpus():
    cfg = parse_data_config({})
    assert cfg == DataConfig() and set(cfg.sources) == {"stdlib", "lee", "lee_sft"}
    assert cfg.sources == embedded_sources()


def test_a_composed_hydra_config_is_accepted():
    raw = OmegaConf.create({"sources": {"mine": {"format": "lee_corpus", "holdout_fraction": 0.2}}, "num_proc": 1})
    cfg = parse_data_config(raw)
    assert cfg.sources["mine"].holdout_fraction == 0.2 and cfg.num_proc == 1
    assert parse_stage_data_config(OmegaConf.create({"mix": {"mine": 1}})).mix == {"mine": 1.0}


def test_schemas_work_as_hydra_structured_configs():
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, {"sources": {"mine": {"format": "jsonl", "path": "/x.jsonl"}}})
    assert merged.sources.mine.text_field == "text" and "stdlib" in merged.sources
    with pytest.raises(Exception, match="textfield"):
        OmegaConf.merge(schema, {"sources": {"mine": {"format": "jsonl", "textfield": "t"}}})
    stage = OmegaConf.merge(OmegaConf.structured(StageDataConfig), {"mix": {"lee": 2}, "overflow": "drop"})
    assert parse_stage_data_config(stage).mix == {"lee": 2.0}


CONFIG_ERRORS = {
    "unknown-source-key": ({"sources": {"x": {"format": "jsonl", "path": "/", "textfield": "t"}}}, {},
                           r"unknown key\(s\) \['textfield'\].*text_field"),
    "unknown-data-key": ({"num_procs": 2}, {}, r"unknown key\(s\) \['num_procs'\]"),
    "unknown-stage-key": ({}, {"mixture": {"lee": 1}}, r"stage.data: unknown key\(s\) \['mixture'\]"),
    "unknown-format": ({"sources": {"x": {"format": "csv"}}}, {}, r"unknown format 'csv'; choose one of"),
    "missing-path": ({"sources": {"x": {"format": "jsonl"}}}, {}, r"data.sources.x.path is required"),
    "path-does-not-exist": ({"sources": {"x": {"format": "jsonl", "path": "/no/such/file.jsonl"}}}, {},
                            r"'/no/such/file.jsonl' does not exist"),
    "glob-matches-nothing": ({"sources": {"x": {"format": "text", "path": "/no/such/*.txt"}}}, {},
                             r"matches no file"),
    "hub-without-name": ({"sources": {"x": {"format": "hub"}}}, {}, r"data.sources.x.hub is required"),
    "builtin-with-path": ({"sources": {"x": {"format": "python_stdlib", "path": "/tmp"}}}, {},
                          r"built in and takes no \['path'\]"),
    "half-an-instruction": ({"sources": {"x": {"format": "lee_corpus", "prompt_field": "q"}}}, {},
                            r"takes no|need both prompt_field and response_field"),
    "bad-holdout": ({"sources": {"x": {"format": "lee_corpus", "holdout_fraction": 1.0}}}, {}, r"holdout_fraction must be in"),
    "mix-names-unknown-source": ({}, {"mix": {"wiki": 1}}, r"mix names source\(s\) \['wiki'\].*defined: \['lee', 'lee_sft', 'stdlib'\]"),
    "non-positive-share": ({}, {"mix": {"lee": 0}}, r"mix.lee must be a positive share"),
    "long-share-without-length": ({}, {"mix": {"lee": 1}, "long_doc_share": 0.5}, r"needs long_doc_min_tokens >= 2"),
    "long-length-over-seq-len": ({}, {"mix": {"lee": 1}, "long_doc_share": 0.5, "long_doc_min_tokens": 4096},
                                 r"long_doc_min_tokens=4096 exceeds the stage's seq_len 128"),
    "bad-overflow": ({}, {"overflow": "truncate"}, r"overflow: 'truncate' is not one of \['split', 'drop'\]"),
    "bad-sample-by": ({"sources": {"x": {"format": "lee_corpus", "sample_by": "page"}}}, {},
                      r"sample_by: 'page' is not one of"),
    "wrong-type": ({"lookahead": "many"}, {}, r"data.lookahead: expected int"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_name_the_fix(case):
    data, stage, message = CONFIG_ERRORS[case]
    with pytest.raises(ConfigError, match=message):
        build(data, stage)


def test_sft_stage_needs_chat_sources():
    with pytest.raises(ConfigError, match=r"source\(s\) \['lee'\] hold plain documents"):
        build({}, {"mix": {"lee": 1, "lee_sft": 1}}, mode="sft")


def test_stage_arguments_are_checked():
    with pytest.raises(ConfigError, match="mode must be one of"):
        build({}, {}, mode="rlhf")
    with pytest.raises(ConfigError, match="dp_rank < dp_size"):
        build({}, {}, dp_rank=2, dp_size=2)
    with pytest.raises(ConfigError, match="seq_len must be >= 2"):
        build({}, {}, seq_len=1)
