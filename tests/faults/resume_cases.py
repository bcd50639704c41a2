"""Shared by the fault-injection tests: the run they interrupt, and how a resumed run is compared with it
(the uninterrupted run itself is conftest.py's session fixture)."""

from __future__ import annotations

from tests.trainer.cli_run import records, same_export, same_numbers, same_rows

# tiny: stages short (steps 1-2), long (3-4, MoBA -> full at its half), sft (5); a checkpoint after every step
TINY = ["recipe=tiny", "logger=none", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=10"]
STEPS = 5


def what_the_run_did(out) -> dict:
    """Everything that must not depend on interruptions: losses, grad norms, evaluations, the export."""
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
    }


def assert_same_run(got, want) -> None:
    """Equal; the computed values (losses, grad norms, evaluation losses, the exported weights) up to
    cli_run.ROUNDING."""
    a, b = what_the_run_did(got), what_the_run_did(want)
    for key in ("losses", "grad_norms"):
        assert same_numbers(a[key], b[key], key), f"{key} differ from the uninterrupted run: {a[key]} vs {b[key]}"
    assert same_rows(a["eval"], b["eval"], rounded=(1, 2), what="eval"), (           # (stage, mean, tail loss)
        f"evaluations differ from the uninterrupted run: {a['eval']} vs {b['eval']}")
    for key in ("steps", "plans", "passkey", "stage_ends"):
        assert a[key] == b[key], f"{key} differ from the uninterrupted run: {a[key]} vs {b[key]}"
    assert same_export(got / "hf_model", want / "hf_model"), "the export differs from the uninterrupted run's"
