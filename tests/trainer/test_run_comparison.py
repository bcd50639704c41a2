"""The comparisons behind the resume tests tell a rounding from a resume bug."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from tests.trainer.cli_run import ROUNDING, RoundingDifference, same_export, same_number, same_numbers, same_rows


def test_equal_numbers_match_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same_number(10.5, 10.5) and same_numbers([1.0, float("nan")], [1.0, float("nan")])


def test_a_rounding_matches_with_a_warning_and_a_resume_bug_does_not():
    with pytest.warns(RoundingDifference, match="loss: 10.00000001 vs 10.0"):
        assert same_number(10.00000001, 10.0, "loss")
    assert not same_number(10.0 * (1 + 1e-4), 10.0)
    assert not same_number(None, 10.0) and not same_number(float("nan"), 10.0)
    assert not same_numbers([1.0], [1.0, 2.0])


def test_rows_match_exactly_but_at_the_rounded_fields():
    want = [(0, 10.0, "lee"), (1, 9.0, "python")]
    with pytest.warns(RoundingDifference, match=r"eval\[1\]\[1\]"):
        assert same_rows([(0, 10.0, "lee"), (1, 9.000000001, "python")], want, rounded=(1,), what="eval")
    assert not same_rows([(0, 10.0, "lee"), (1, 9.001, "python")], want, rounded=(1,))      # beyond a rounding
    assert not same_rows([(0, 10.0, "lee"), (2, 9.0, "python")], want, rounded=(1,))        # an exact field
    assert not same_rows([(0, 10.0, "lee")], want, rounded=(1,))
    assert not same_rows([(0, 10.0), (1, 9.0)], want, rounded=(1,))


def _export(path, weights: dict, config: dict | None = None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    save_file(weights, str(path / "model.safetensors"))
    return path


def test_exports_match_bit_for_bit_or_within_a_rounding_of_each_tensor(tmp_path):
    w = {"a": torch.linspace(-1, 1, 64), "b": torch.ones(3, 4)}
    want = _export(tmp_path / "want", w)
    assert same_export(_export(tmp_path / "same", dict(w)), want)
    nudged = dict(w, a=w["a"] + ROUNDING / 10)
    with pytest.warns(RoundingDifference):
        assert same_export(_export(tmp_path / "nudged", nudged), want)
    assert not same_export(_export(tmp_path / "stepped", dict(w, a=w["a"] + 5e-4)), want)     # one LR-sized step
    assert not same_export(_export(tmp_path / "renamed", {"a": w["a"], "c": w["b"]}), want)
    assert not same_export(_export(tmp_path / "config", dict(w), {"model_type": "qwen2"}), want)
