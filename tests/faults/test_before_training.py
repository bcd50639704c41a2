"""Bad input fails before the first step, as one line naming the fix, with no traceback; day-one ergonomics."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from moba_train.data import embedded
from moba_train.data.stage import holdout_mask
from tests.trainer.cli_run import ROOT, run_cli
from tests.trainer.compose import compose_config

TINY = ["recipe=tiny", "logger=none"]


def fails_before_training(out, overrides, nproc: int = 1, seconds: float = 60) -> str:
    """Run; assert it failed with one moba-train line, no traceback and no step; return that line."""
    started = time.perf_counter()
    res = run_cli(out, overrides, nproc=nproc, check=False)
    assert res.returncode != 0
    if nproc == 1:                                       # torchrun reports a failed child with a traceback of its own
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists() or '"kind": "train"' not in (out / "metrics.jsonl").read_text()
    assert time.perf_counter() - started < seconds
    lines = [line for line in res.stderr.splitlines() if line.startswith("moba-train:")]
    assert lines, res.stderr[-3000:]
    return lines[-1]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.timeout(300)
def test_a_wrong_field_of_a_source_only_the_second_stage_uses_fails_before_the_first_stage_trains(tmp_path):
    bad = jsonl(tmp_path / "bad.jsonl", [{"body": a} for a in embedded.lee_articles()[:20]])
    line = fails_before_training(tmp_path / "run", [*TINY, f"+data.sources.bad={{format: jsonl, path: {bad}}}",
                                                    "+stages.1.data.mix.bad=1.0"])
    assert "'bad'" in line and "text" in line


@pytest.mark.timeout(300)
def test_no_held_out_documents_is_found_before_training(tmp_path):
    line = fails_before_training(tmp_path / "run", [*TINY, "data.sources.stdlib.holdout_fraction=0.0"])
    assert "stages[0] (short): no held-out document" in line and "holdout_fraction" in line


@pytest.mark.timeout(300)
def test_held_out_conversations_longer_than_the_stage_blame_seq_len_not_holdout_fraction(tmp_path):
    n = 40
    held = holdout_mask(n, 0.1)
    assert held.any() and not held.all()
    article = embedded.lee_articles()[0]
    rows = [{"prompt": "Summarize: " + (article * 3 if h else "a short text"), "response": "ok"} for h in held]
    sft = jsonl(tmp_path / "sft.jsonl", rows)
    line = fails_before_training(tmp_path / "run", [
        *TINY, f"+data.sources.chat={{format: jsonl, path: {sft}, prompt_field: prompt, response_field: response, "
               f"holdout_fraction: 0.1}}", "+stages.2.data.mix.chat=1.0", "~stages.2.data.mix.lee_sft"])
    assert "every held-out conversation" in line and "longer than seq_len 256" in line
    assert "raise the stage's seq_len" in line


@pytest.mark.timeout(300)
def test_sequence_parallelism_that_does_not_divide_the_heads_fails_before_the_weights_load(tmp_path):
    line = fails_before_training(tmp_path / "run", [*TINY, "parallel=ulysses2", "model.config.hidden_size=48",
                                                    "model.config.num_attention_heads=3",
                                                    "model.config.num_key_value_heads=1"], nproc=2)
    assert "sequence_parallel=2 must divide the 3 query heads" in line


@pytest.mark.parametrize("overrides,message", [
    (["attention.block_size=0"], "attention: block_size must be an int >= 1, got 0"),
    (["model=hf", "model.path=/nonexistent/model"], "model.path=/nonexistent/model does not exist"),
    (["trainer.grad_clp=2"], "unknown key 'trainer.grad_clp': trainer has no 'grad_clp' (did you mean 'grad_clip'?)"),
    (["stages.1.seqlen=512"], "stages.1 has no 'seqlen' (did you mean 'seq_len'?)"),
    (["eval.on_error=ignore"], "eval.on_error: 'ignore' is not one of ['continue', 'fail']"),
    (["attention.full_backend=fa4"], "attention: full-attention backend 'fa4' is unavailable: FlashAttention-4 is not "
                                     "installed; install it with `pip install 'moba-train[fa4]'`"),
    (["+stages.2.attention.full_backend=varlen"], "stages[2] (sft) attention: full-attention backend 'varlen' is "
                                                  "unavailable: no CUDA device"),
], ids=["block-size-0", "missing-model-path", "typo-trainer", "typo-stage", "bad-choice", "fa4-not-installed",
        "last-stage-backend-without-cuda"])
@pytest.mark.timeout(120)
def test_bad_values_get_one_line_naming_the_fix(tmp_path, overrides, message):
    assert message in fails_before_training(tmp_path / "run", [*TINY, *overrides], seconds=30)


def test_help_lists_the_modes_and_common_keys():
    res = subprocess.run([sys.executable, "-m", "moba_train", "--help"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0
    for text in ("mode=eval checkpoint=PATH", "dry_run=true nodes=N gpus_per_node=G", "debug=smoke",
                 "recipe=path/to/recipe.yaml", "trainer.resume=auto|never|DIR", "recipes: demo"):
        assert text in res.stdout


def test_debug_runs_write_under_their_own_directory():
    assert compose_config(["recipe=tiny", "debug=smoke"])["paths"]["output_dir"] == "outputs/tiny-smoke"
    assert compose_config(["recipe=tiny", "debug=short"])["paths"]["output_dir"] == "outputs/tiny-short"
    assert compose_config(["recipe=tiny"])["paths"]["output_dir"] == "outputs/tiny"


@pytest.mark.timeout(300)
def test_a_recipe_given_by_path_runs_quietly_and_exports_readable_files(tmp_path):
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text((ROOT / "recipes" / "tiny.yaml").read_text().replace("run_name: tiny", "run_name: mine"))
    out = tmp_path / "run"
    res = run_cli(out, [f"recipe={recipe}", "logger=none", "eval.passkey.enabled=false"])
    assert "run mine finished" in res.stdout
    noise = [line for line in (res.stdout + res.stderr).splitlines() if "gcc" in line or "built successfully" in line]
    assert not noise
    skips = [line for line in res.stdout.splitlines() if "x empty file (e.g." in line]
    assert len(skips) == 1                                  # the skipped records are listed once, not per stage
    for path in (out / "hf_model").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path     # readable like the rest


def test_a_recipe_file_without_the_global_package_line_is_refused(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("run_name: x\n")
    res = subprocess.run([sys.executable, "-m", "moba_train", f"recipe={recipe}"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 1 and "must start with the line `# @package _global_`" in res.stderr


@pytest.mark.timeout(300)
def test_one_ctrl_c_while_tokenizing_stops_within_seconds_and_exits_0(tmp_path):
    big = jsonl(tmp_path / "big.jsonl", [{"text": f"{i} {a}"} for i in range(40) for a in embedded.lee_articles()])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moba_train", f"paths.output_dir={out}", *TINY, "data.num_proc=2",
           f"+data.sources.big={{format: jsonl, path: {big}}}", "+stages.0.data.mix.big=1.0", "~stages.0.data.mix.stdlib"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", DS_ACCELERATOR="cpu")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "tokenizing source 'big'" in line:
            time.sleep(0.5)
            proc.send_signal(2)
            sent = time.perf_counter()
            break
    else:
        pytest.fail("never saw the tokenization start:\n" + "".join(seen[-30:]))
    rest = proc.communicate(timeout=60)[0]
    assert time.perf_counter() - sent < 15
    assert proc.returncode == 0, rest[-3000:]
    assert "stopped by SIGINT" in rest
    assert not list((out / "checkpoints").glob("step*")) if (out / "checkpoints").exists() else True


@pytest.mark.timeout(600)
def test_ctrl_c_during_a_stage_end_evaluation_keeps_the_checkpoint_and_the_next_run_finishes_it(tmp_path):
    out = tmp_path / "run"
    res = run_cli(out, [*TINY, "debug.fail_evaluations=[passkey:interrupt]", "trainer.export=false"])
    assert "stopped by SIGINT" in res.stdout
    assert (out / "checkpoints" / "step00000002").is_dir()
    run_cli(out, [*TINY, "trainer.export=false"])
    from tests.trainer.cli_run import records
    assert [r["stage_index"] for r in records(out, "passkey")] == [0, 1, 2]
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5]
    assert np.all(np.array([r["status"] for r in records(out, "run_end")]) == "finished")
