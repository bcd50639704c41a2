"""The run's plots from metrics records: valid PNGs, and only the plots the records allow."""

import struct

import pytest

from moba_train.eval.plots import write_plots


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def train(step, stage, seq_len, loss):
    return {"kind": "train", "step": step, "stage": stage, "seq_len": seq_len, "loss": loss}


def evaluation(step, stage, seq_len):
    edges = [seq_len * b // 4 for b in range(5)]
    return {"kind": "eval", "step": step, "stage": stage, "seq_len": seq_len, "bucket_edges": edges,
            "bucket_loss": [3.0, 2.5, None, 2.2], "mean_loss": 2.6, "tail_loss": 2.1}


def passkey(step, lengths, grid):
    return {"kind": "passkey", "step": step, "stage": "s", "lengths": lengths, "depths": [0.1, 0.9],
            "accuracy_grid": grid}


RECORDS = [train(1, "ctx1k", 1024, 3.2), train(2, "ctx1k", 1024, 3.0), train(3, "ctx4k", 4096, None),
           train(4, "ctx4k", 4096, 2.8), evaluation(2, "ctx1k", 1024), evaluation(4, "ctx4k", 4096),
           passkey(2, [1024], [[1.0], [0.0]]), passkey(4, [1024, 4096], [[1.0, 0.0], [None, 1.0]])]


def test_all_three_plots_are_valid_pngs(tmp_path):
    written = write_plots(RECORDS, tmp_path / "plots")
    assert sorted(written) == ["loss_by_position", "loss_by_step", "passkey_heatmap"]
    for path in written.values():
        width, height = png_size(path)
        assert width > 200 and height > 150
    assert not list((tmp_path / "plots").glob(".*"))            # no temporary files left


@pytest.mark.parametrize("kinds,expected", [({"train"}, ["loss_by_step"]), ({"eval", "passkey"},
                                            ["loss_by_position", "passkey_heatmap"]), (set(), [])],
                         ids=["train-only", "evals-only", "nothing"])
def test_only_plots_with_records_are_drawn(tmp_path, kinds, expected):
    assert sorted(write_plots([r for r in RECORDS if r["kind"] in kinds], tmp_path)) == expected
