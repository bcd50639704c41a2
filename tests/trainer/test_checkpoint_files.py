"""`resume=auto` finds the newest complete checkpoint and never a torn one."""

import json

from moba_train.trainer import checkpoint
from moba_train.job.checkpoint_files import STATE_FILE, TrainState, read_state


def _complete(root, tag, step):
    (root / tag).mkdir(parents=True)
    (root / tag / STATE_FILE).write_text(json.dumps({"global_step": step}))


def test_latest_pointer_wins(tmp_path):
    _complete(tmp_path, "step00000002", 2)
    _complete(tmp_path, "step00000004", 4)
    (tmp_path / "latest").write_text("step00000002")
    assert checkpoint.find_resumable(tmp_path).name == "step00000002"


def test_pointer_to_incomplete_checkpoint_falls_back_to_newest_complete(tmp_path):
    _complete(tmp_path, "step00000002", 2)
    (tmp_path / "step00000004").mkdir()                      # killed while writing: no state file
    (tmp_path / "latest").write_text("step00000004")
    assert checkpoint.find_resumable(tmp_path).name == "step00000002"


def test_partial_directory_is_ignored(tmp_path):
    (tmp_path / ".partial" / "step00000006").mkdir(parents=True)
    assert checkpoint.find_resumable(tmp_path) is None
    assert checkpoint.find_resumable(tmp_path / "missing") is None


def test_state_round_trip(tmp_path):
    state = TrainState(stage_index=1, stage_step=3, global_step=7, data_state={"position": 5})
    _complete(tmp_path, "x", 0)
    (tmp_path / "x" / STATE_FILE).write_text(json.dumps(state.__dict__))
    assert read_state(tmp_path / "x") == state
