"""tiny's uninterrupted run, once per test session for every fault test that compares against it (a fixture
imported into several test modules would run once per module)."""

from __future__ import annotations

import pytest

from tests.faults.resume_cases import TINY
from tests.trainer.cli_run import run_cli


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run_cli(out, TINY)
    return out
