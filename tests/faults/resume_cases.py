"""Shared by the fault-injection tests: tiny's uninterrupted run, computed once per session, and comparisons."""

from __future__ import annotations

import json

import pytest

from tests.trainer.cli_run import records, run_cli, same_evaluation_loss

# tiny: stages short (steps 1-2), long (3-4, MoBA -> full at its half), sft (5); a checkpoint after every step
TINY = ["recipe=tiny", "logger=none", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=10"]
STEPS = 5


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run_cli(out, TINY)
    return out


def what_the_run_did(out) -> dict:
    """Everything that must not depend on interruptions: losses, grad norms, evaluations, the export's bytes."""
    train = records(out)
    return {
        "steps": [r["step"] for r in train],
        "losses": [r["loss"] for r in train],
        "grad_norms": [r["grad_norm"] for r in train],
        "plans": [r["plan"] for r in train],
        "eval": [(r["stage_index"], r["mean_loss"], r["tail_loss"]) for r in records(out, "eval")],
        "passkey": [(r["stage_index"], r["accuracy"], [t["answer"] for t in r["trials"]])
                    for r in records(out, "passkey")],
        "stage_ends": [(r["stage_index"], r["steps"], r["tokens"], r["plan"]) for r in records(out, "stage_end")],
        "export_config": json.loads((out / "hf_model" / "config.json").read_text()),
        "export_bytes": (out / "hf_model" / "model.safetensors").read_bytes(),
    }


def assert_same_run(got, want) -> None:
    """Bit for bit, but the evaluation losses (`same_evaluation_loss`)."""
    a, b = what_the_run_did(got), what_the_run_did(want)
    for key in b:
        if key == "eval":
            assert [r[0] for r in a[key]] == [r[0] for r in b[key]], "evaluations differ from the uninterrupted run"
            for x, y in zip(a[key], b[key]):
                assert all(same_evaluation_loss(u, v) for u, v in zip(x[1:], y[1:])), (
                    f"evaluation losses differ from the uninterrupted run: {x} vs {y}")
        else:
            assert a[key] == b[key], f"{key} differs from the uninterrupted run"
