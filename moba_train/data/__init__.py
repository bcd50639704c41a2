"""Sources -> tokenized cache -> packed micro-batches: per-stage mixes, SFT rendering, resumable sampling,
and the embedded default corpus. The trainer needs only what is exported here (docs/data.md)."""

from moba_train.data.config import (DataConfig, SourceConfig, StageDataConfig, embedded_sources, parse_data_config,
                                    parse_stage_data_config)
from moba_train.data.skips import DataError
from moba_train.data.stage import StageData, build_stage_data, check_stage_data, count_target_tokens

__all__ = [
    "DataConfig", "SourceConfig", "StageDataConfig", "embedded_sources", "parse_data_config",
    "parse_stage_data_config", "DataError", "StageData", "build_stage_data", "check_stage_data", "count_target_tokens",
]
