"""Every recipe runs one step per stage on a tiny model (debug=smoke scales it down), on CPU, and the dry run
reads the same resolved stages as the trainer."""

import json

import pytest

from moba_train.config import load_run_config
from moba_train.trainer.dry_run import DryRunRequest, dry_run
from tests.trainer.cli_run import records, run_cli
from tests.trainer.compose import RECIPES, compose_config, recipe_overrides


@pytest.mark.timeout(400)
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_one_step_per_stage_as_the_dry_run_says(tmp_path, recipe):
    out = tmp_path / "run"
    overrides = [*recipe_overrides(recipe), "debug=smoke", "trainer.export=false"]
    run_cli(out, overrides)
    train = records(out)
    starts = records(out, "stage_start")
    assert len(train) == len(starts) >= 1
    assert all(r["loss"] is not None and 0 < r["loss"] < 20 for r in train)
    assert (out / "checkpoints" / "latest").is_file()

    cfg = load_run_config(compose_config([*overrides, f"paths.output_dir={out}"]))
    assert [s["resolved"] for s in starts] == [json.loads(json.dumps(s.describe())) for s in cfg.stages]
    report = dry_run(cfg, DryRunRequest(nodes=1, gpus_per_node=1))
    rows = [line for line in report.text.splitlines() if line.startswith("| ") and " | " in line]
    for stage, start in zip(cfg.stages, starts):
        row = next(r for r in rows if r.startswith(f"| {stage.name} ") and f"| {stage.seq_len:,} " in r)
        assert start["plan"] in row                      # the dry run shows the plan the trainer started with
        assert f"| {stage.total_steps(1):,} " in row     # and the steps it would train without debug's cap
