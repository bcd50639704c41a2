"""A tiny run, killed and resumed, with wandb offline: the metrics it records, one wandb run id across the
restart, the plots, and no network access from the Python side of the process."""

import json
import struct
from pathlib import Path

import pytest

from tests.tracking.moba_cli import ROOT, moba_train, records

PEAK_TFLOPS = 0.001
RUN = ["recipe=tiny", "debug.max_steps_per_stage=1", "eval.passkey.depths=[0.5]", "trainer.export=false",
       f"logger.peak_tflops={PEAK_TFLOPS}"]

# Loaded by every Python process started with this directory on PYTHONPATH: logs any attempt to resolve or
# connect to a host other than this machine.
SPY = '''
import os, socket
LOG = os.environ["NET_ATTEMPTS_LOG"]
LOCAL = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}
def _note(what):
    with open(LOG, "a") as f:
        f.write(what + "\\n")
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *a, **k):
    if host not in LOCAL and not str(host).startswith("127."):
        _note(f"getaddrinfo {host}")
    return _getaddrinfo(host, *a, **k)
socket.getaddrinfo = getaddrinfo
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL and not str(address[0]).startswith("127."):
        _note(f"connect {address}")
    return _connect(self, address)
socket.socket.connect = connect
'''


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    spy = tmp / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    attempts = tmp / "net_attempts.log"
    env = {"WANDB_MODE": None, "NETRC": str(tmp / "no-netrc"), "PYTHONPATH": f"{spy}:{ROOT}",
           "NET_ATTEMPTS_LOG": str(attempts)}
    out = tmp / "run"
    args = [*RUN, f"paths.output_dir={out}"]
    first = moba_train([*args, "debug.crash_after_step=2"], tmp, env=env, check=False)
    assert first.returncode == 17, first.stderr[-3000:]
    first_runs = sorted((out / "wandb").glob("offline-run-*"))
    moba_train(args, tmp, env=env)
    return out, first_runs, attempts


def test_wandb_offline_runs_share_one_id_across_the_restart(resumed_run):
    out, first_runs, _ = resumed_run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(first_runs) == 1 and len(runs) == 2
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    assert len(ids) == 1
    run_id = ids.pop()
    for run in runs:
        assert (run / f"run-{run_id}.wandb").stat().st_size > 0
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["wandb_run_id"] == run_id


def test_nothing_reached_for_the_network(resumed_run):
    _, _, attempts = resumed_run
    assert not attempts.exists(), attempts.read_text()


def test_train_records_carry_speed_flops_mfu_memory_and_data_wait(resumed_run):
    out, _, _ = resumed_run
    train = records(out / "metrics.jsonl")
    assert [r["step"] for r in train] == [1, 2, 3]              # the step redone after the kill appears once
    # the tiny recipe's Llama: hidden 64, MLP 128, 4 layers, 4 heads / 2 KV heads, vocab 49152 (tied head)
    h, inter, layers, kv_width, vocab = 64, 128, 4, 2 * 16, 49152
    linear = layers * (2 * h * h + 2 * h * kv_width + 3 * h * inter) + h * vocab
    for r in train:
        assert r["loss"] > 0 and r["grad_norm"] > 0
        assert r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_seconds"])
        assert r["tokens_per_s_per_gpu"] == r["tokens_per_s"]           # one process
        assert r["flops"] == pytest.approx(6 * linear * r["tokens"] + r["attention_flops"], rel=1e-12)
        causal_bound = 3 * 4 * h * layers * r["seq_len"] * (r["seq_len"] + 1) / 2 * 1.5   # + gate scores
        assert 0 < r["attention_flops"] < causal_bound
        assert r["tflops_per_s"] == pytest.approx(r["flops"] / r["step_seconds"] / 1e12)
        assert r["peak_tflops"] == PEAK_TFLOPS and r["mfu"] == pytest.approx(r["tflops_per_s"] / PEAK_TFLOPS)
        assert 0 <= r["data_wait_share"] <= 1
        assert r["peak_memory_gib"] > 0 and r["peak_memory_kind"] == "max_rss"


def test_routing_statistics_on_each_stage_first_step(resumed_run):
    out, _, _ = resumed_run
    routing = records(out / "metrics.jsonl", "routing")
    assert [r["step"] for r in routing] == [1, 2, 3]
    for r in routing:
        assert sum(r["distance_counts"]) > 0 and r["distance_counts"][0] == 0
        assert 0 < r["mass_captured"] < 1 and r["sampled_queries"] > 0


def test_evaluations_and_plots(resumed_run):
    out, _, _ = resumed_run
    evals = records(out / "metrics.jsonl", "eval")
    assert [r["stage"] for r in evals] == ["short", "long", "sft"]
    assert all(len(r["bucket_loss"]) == 16 and r["tail_loss"] is not None for r in evals)
    passkey = records(out / "metrics.jsonl", "passkey")
    assert [(r["lengths"], len(r["accuracy_grid"])) for r in passkey] == [([256], 1), ([512], 1), ([256], 1)]
    for name in ("loss_by_step", "loss_by_position", "passkey_heatmap"):
        width, height = png_size(out / "plots" / f"{name}.png")
        assert width > 100 and height > 100
