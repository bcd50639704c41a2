"""Atomic checkpoints: DeepSpeed's engine state plus the run's own state, found again by `resume=auto`.

Layout under `<output_dir>/checkpoints/`:
    .partial/<tag>/      being written (DeepSpeed files, rng_rank<r>.pt, manifest.json, trainer_state.json)
    <tag>/               complete: renamed from .partial only after every rank has written
    latest               the newest complete tag, replaced atomically
A crash at any moment leaves either the previous `latest` or the new one, never a torn checkpoint. The
manifest (sizes and CRC32 of every file, computed by all ranks, each over a share) is written before the
rename; `resume=auto` checks it and skips a corrupt or truncated checkpoint for the newest valid one
(trainer.on_corrupt_checkpoint: fallback) or stops naming it (fail).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moba_train.errors import UserError
from moba_train.job.checkpoint_files import (STATE_FILE, CorruptCheckpoint, TrainState, check_files, digest,
                                             is_checkpoint, listed_files, read_manifest, read_state, write_manifest)

log = logging.getLogger(__name__)


def _tag(state: TrainState) -> str:
    return f"step{state.global_step:08d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(value) -> list:
    """`value` of every rank (a list of one on a single process)."""
    if _world() == 1:
        return [value]
    out = [None] * _world()
    dist.all_gather_object(out, value)
    return out


def _manifest(ckpt: Path) -> dict[str, dict]:
    """Sizes and checksums of every file of `ckpt`, each rank reading a share of them (collective)."""
    names = listed_files(ckpt)
    mine = {name: digest(ckpt / name) for name in names[_rank()::_world()]}
    return {k: v for part in _gather(mine) for k, v in part.items()}


def verify(ckpt: Path) -> None:
    """CorruptCheckpoint naming the problems when a file of `ckpt` is missing, truncated or changed (collective:
    every rank checks a share). A checkpoint without a manifest (an older moba-train's) is taken as it is."""
    problems = []
    try:
        read_state(ckpt)
    except ValueError as e:
        problems.append(str(e).split(";")[0])
    entries = read_manifest(ckpt) if not problems else None
    if entries is not None:
        names = sorted(entries)
        problems += check_files(ckpt, names[_rank()::_world()], entries)
    problems = [p for part in _gather(problems) for p in part]
    if problems:
        raise CorruptCheckpoint(ckpt, problems)


def save(engine, root: Path, state: TrainState, keep: int) -> Path:
    """Write a checkpoint of the engine and `state`; every rank must call it."""
    tag = _tag(state)
    partial = root / ".partial"
    if _rank() == 0 and (partial / tag).exists():
        shutil.rmtree(partial / tag)               # leftovers of a crash during an earlier save
    _barrier()
    engine.save_checkpoint(str(partial), tag=tag, save_latest=False)
    torch.save(_rng_state(), partial / tag / f"rng_rank{_rank()}.pt")
    _barrier()
    entries = _manifest(partial / tag)
    if _rank() == 0:
        write_manifest(partial / tag, entries)
        (partial / tag / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial / tag, final)
        _write_atomic(root / "latest", tag)
        _prune(root, keep, protect=tag)
        log.info("checkpoint %s written", final)
    _barrier()
    return root / tag


def mark_evaluated(root: Path, state: TrainState) -> None:
    """Record in the newest checkpoint that its stage's evaluation completed (rank 0; only the state file changes)."""
    if _rank() == 0:
        latest = root / (root / "latest").read_text().strip()
        _write_atomic(latest / STATE_FILE, json.dumps(asdict(state), indent=1))
    _barrier()


def candidates(root: Path) -> list[Path]:
    """Complete checkpoints, newest first: the one `latest` names, then the others by step."""
    if not root.is_dir():
        return []
    complete = sorted((p for p in root.glob("step*") if p.is_dir() and not p.name.endswith("_universal")
                       and is_checkpoint(p)), reverse=True)
    latest = root / "latest"
    named = root / latest.read_text().strip() if latest.is_file() else None
    if named is not None and named not in complete:
        log.warning("checkpoint pointer %s names %s, which is incomplete; looking for an older one", latest, named)
    elif named is not None:
        complete.remove(named)
        complete.insert(0, named)
    return complete


def find_resumable(root: Path, on_corrupt: str = "fallback") -> Path | None:
    """The newest complete checkpoint whose files match its manifest (collective).

    A corrupt one is reported by path and skipped (on_corrupt="fallback") or stops the run with the fix
    ("fail")."""
    for ckpt in candidates(root):
        try:
            verify(ckpt)
            return ckpt
        except CorruptCheckpoint as e:
            if on_corrupt == "fail":
                raise CorruptCheckpoint(e.ckpt, e.problems + [
                    "delete it (or move it aside) to resume from the one before, or set "
                    "trainer.on_corrupt_checkpoint=fallback"]) from None
            if _rank() == 0:
                print(f"moba-train: {e}; skipping it for the newest valid checkpoint", flush=True)
            log.warning("%s", e)
    return None


def load(engine, ckpt: Path, universal: bool) -> None:
    """Restore engine state (and this rank's RNG when the layout is unchanged)."""
    tag = ckpt.name + ("_universal" if universal else "")
    load_dir = ckpt.parent
    try:
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing key" in line
                      or "Unexpected key" in line), None)
        if first is None:
            raise
        raise UserError(f"checkpoint {ckpt} does not match the recipe's model ({first.rstrip('.')}); resume with "
                         f"the recipe and model it was trained with, set trainer.resume=never to start over, or "
                         f"pick another paths.output_dir") from None
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {load_dir / tag}; it may be from another model")
    bad = [name for name, p in engine.module.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise UserError(f"checkpoint {ckpt} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); resume "
                         f"from an older one with trainer.resume=<its directory>")
    rng_file = ckpt / f"rng_rank{_rank()}.pt"
    if not universal and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))


def convert_to_universal(ckpt: Path) -> None:
    """Reshard support: DeepSpeed's universal format, made once next to the checkpoint (rank 0)."""
    out = ckpt.parent / f"{ckpt.name}_universal"
    if _rank() == 0 and not (out / "zero").exists():
        # ds_to_universal wants `latest` naming the tag inside its input folder's parent
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
               "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        log.info("converting %s to a universal checkpoint for a new parallel layout", ckpt)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {ckpt}:\n{res.stderr[-2000:]}")
    _barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep: int, protect: str) -> None:
    tags = sorted(p for p in root.glob("step*") if p.is_dir() and not p.name.endswith("_universal"))
    for old in tags[:-keep] if keep > 0 else []:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(root / f"{old.name}_universal", ignore_errors=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
