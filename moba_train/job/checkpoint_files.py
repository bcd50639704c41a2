"""What a moba-train checkpoint directory holds besides DeepSpeed's files: the run's state and a manifest.

Read by the trainer (resume) and by evaluation (mode=eval on a training checkpoint); written by
moba_train.trainer.checkpoint.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from moba_train.errors import UserError

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where the run stands; everything needed besides the engine to continue exactly."""

    stage_index: int = 0
    stage_step: int = 0                 # optimizer steps done in the current stage
    global_step: int = 0
    tokens_seen: int = 0
    bad_steps_total: int = 0
    data_state: dict = field(default_factory=dict)    # the current stage's sampler (global, rank-independent)
    plan_progress: float = 0.0
    world: dict = field(default_factory=dict)         # {"dp": .., "sp": ..} when saved
    wandb_run_id: str | None = None
    # A stage trained and checkpointed whose stage-end evaluation has not completed: resuming finishes it first.
    eval_pending: int | None = None
    # Part-way evaluations of the current stage completed (stages[].eval_at); the next one is due at its step.
    part_way_evals_done: int = 0
    # The routing convention (attention centroids) each stage trained so far used, by stage name; None in
    # checkpoints written before it was recorded, whose stages all used "fp32".
    centroids: dict | None = None


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def read_state(ckpt: Path) -> TrainState:
    try:
        return TrainState(**json.loads((ckpt / STATE_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"checkpoint {ckpt} has no readable {STATE_FILE} ({e}); point `trainer.resume` at a "
                         f"complete checkpoint directory or set trainer.resume=never") from None


# ---------------------------------------------------------------------------------------- manifest
# manifest.json lists every file of a checkpoint (but itself and the state file, which is JSON that
# read_state checks, and which the trainer rewrites after a stage's evaluation) with its size and CRC32.
# It is written before the checkpoint is renamed into place and `latest` moves, and checked on resume.
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
UNLISTED = frozenset({STATE_FILE, MANIFEST_FILE})
READ_CHUNK = 16 << 20


def digest(path: Path) -> dict:
    """{"bytes": size, "crc32": hex} of one file, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": path.stat().st_size, "crc32": f"{crc:08x}"}


def listed_files(ckpt: Path) -> list[str]:
    """The files a manifest covers, relative to the checkpoint, sorted."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name not in UNLISTED)


def write_manifest(ckpt: Path, entries: dict[str, dict]) -> None:
    (ckpt / MANIFEST_FILE).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1))


def read_manifest(ckpt: Path) -> dict[str, dict] | None:
    """The manifest's entries; None when the checkpoint has none (written before manifests existed)."""
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return dict(data["files"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(ckpt, [f"{MANIFEST_FILE} is unreadable ({e})"]) from None


class CorruptCheckpoint(UserError):
    def __init__(self, ckpt: Path, problems: list[str]):
        self.ckpt, self.problems = ckpt, problems
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        super().__init__(f"checkpoint {ckpt} is corrupt or incomplete: {'; '.join(problems[:3])}{more}")


def check_files(ckpt: Path, names: list[str], entries: dict[str, dict]) -> list[str]:
    """Problems of the listed files `names` (a share of the manifest) against their entries."""
    problems = []
    for name in names:
        path, want = ckpt / name, entries[name]
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{name} has {size:,} bytes, {want['bytes']:,} were written")
        elif digest(path)["crc32"] != want["crc32"]:
            problems.append(f"{name} does not match its checksum (changed on disk since it was written)")
    return problems
