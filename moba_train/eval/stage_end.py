"""What the trainer evaluates when a stage ends besides the position-wise loss: passkey retrieval and plots."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moba_train.distributed.ulysses import apply_sequence_parallel

from .passkey import PasskeyResult, passkey_lengths, run_passkey
from .plots import PLOT_DIR, write_plots

log = logging.getLogger(__name__)


def passkey_cap(cfg) -> int:
    pk = cfg.eval.passkey
    return pk.max_length if torch.cuda.is_available() else pk.max_length_cpu


def stage_passkey(lm, tokenizer, cfg, stage, sp: int, zero3: bool, world: int) -> PasskeyResult | None:
    """Passkey at the stage's length (or the configured lengths up to it), None when off or all capped.

    Generation runs without sequence parallelism (each rank decodes the whole haystack; the cap bounds
    the KV cache that needs); every rank runs the same trials so that ZeRO-3's gathers line up."""
    pk = cfg.eval.passkey
    if not (stage.eval and pk.enabled):
        return None
    lengths, skipped = passkey_lengths(pk.lengths, stage.seq_len, passkey_cap(cfg))
    if not lengths:
        if skipped:
            log.info("passkey skipped at stage %s: haystack lengths %s exceed the cap (eval.passkey.max_length%s)",
                     stage.name, skipped, "" if torch.cuda.is_available() else "_cpu")
        return None
    if sp > 1:
        apply_sequence_parallel(lm, 1)
    try:
        result = run_passkey(lm, tokenizer, lengths, pk.depths, samples=pk.samples, seed=pk.seed,
                             synced_gpus=zero3 and world > 1, haystacks=pk.haystack)
    finally:
        if sp > 1:
            apply_sequence_parallel(lm, sp)
    result.skipped_lengths = skipped
    return result


def plots_from_metrics(output_dir: Path) -> dict[str, Path]:
    from moba_train.tracking.metrics_file import FILE_NAME, read_records

    return write_plots(read_records(output_dir / FILE_NAME), output_dir / PLOT_DIR)
