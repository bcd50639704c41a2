"""Every recipe runs one step per stage on a tiny model (debug=smoke scales it down), on CPU."""

import pytest

from tests.trainer.cli_run import records, run_cli
from tests.trainer.compose import RECIPES, recipe_overrides


@pytest.mark.timeout(400)
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_one_step_per_stage(tmp_path, recipe):
    out = tmp_path / "run"
    run_cli(out, [*recipe_overrides(recipe), "debug=smoke", "trainer.export=false"])
    train = records(out)
    stages = [r["stage"] for r in records(out, "stage_start")]
    assert len(train) == len(stages) >= 1
    assert all(r["loss"] is not None and 0 < r["loss"] < 20 for r in train)
    assert (out / "checkpoints" / "latest").is_file()
