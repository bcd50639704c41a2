"""`metrics.jsonl` in the run directory: one JSON record per line, written by rank 0.

Records carry `kind` (train, eval, passkey, routing, stage_start, stage_end) and `step`. A resumed
run first drops the records after its checkpoint's step, so the file describes exactly the steps
the model really took (a record torn by a kill mid-write is dropped as well).
"""

from __future__ import annotations

import json
from pathlib import Path

FILE_NAME = "metrics.jsonl"


def read_records(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue                              # a line torn by a kill mid-write
    return out


class MetricsFile:
    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int, drop=lambda record: False) -> list[dict]:
        """Keep the records up to `step` (a fresh run keeps none) but those `drop` selects; returns them."""
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= step and not drop(r)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
