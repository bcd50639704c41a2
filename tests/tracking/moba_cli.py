"""Run `python -m moba_train` in a subprocess with an environment of the test's choosing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_ENV = {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def moba_train(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 400,
               check: bool = True) -> subprocess.CompletedProcess:
    """`env` entries with the value None are removed from the environment."""
    merged = {**os.environ, **BASE_ENV, **(env or {})}
    full_env = {k: v for k, v in merged.items() if v is not None}
    res = subprocess.run([sys.executable, "-m", "moba_train", *args], cwd=cwd, env=full_env, capture_output=True,
                         text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"moba_train {' '.join(args)} exited {res.returncode}:\n{res.stdout[-4000:]}\n"
                             f"{res.stderr[-6000:]}")
    return res


def records(path: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]
