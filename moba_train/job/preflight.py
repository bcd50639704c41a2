"""Everything about a run that can fail before a weight is loaded, checked for every stage at start-up.

A problem of the last stage (a source that does not exist here, sequence parallelism that does not
divide the processes) fails before the first stage trains, not hours later.
"""

from __future__ import annotations

from moba_train.config import RunConfig
from moba_train.data import DataError, check_stage_data
from moba_train.data.embedded import lee_path
from moba_train.schema import ConfigError


def preflight(cfg: RunConfig, world: int) -> None:
    """ConfigError (or DataError) naming the stage and the fix; nothing is read beyond file metadata."""
    for stage in cfg.stages:
        sp = stage.sequence_parallel
        if world % sp:
            raise ConfigError(f"{stage.where}: sequence_parallel={sp} must divide the {world} processes; launch a "
                              f"multiple of {sp} or change {stage.where.split(' ')[0]}.sequence_parallel")
        check_stage_data(cfg.data, stage.data, seq_len=stage.seq_len, mode=stage.mode, where=stage.where)
    if cfg.eval.passkey.enabled and cfg.eval.passkey.haystack == "lee" and any(s.eval for s in cfg.stages):
        try:
            lee_path()                                        # passkey haystacks are cut from the Lee articles
        except DataError as e:
            raise ConfigError(f"eval.passkey needs its haystack text: {e}; or set eval.passkey.enabled=false") from None
