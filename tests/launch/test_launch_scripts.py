"""The launch scripts: what they would launch (with stand-ins for deepspeed, torchrun and srun), and their
DRY_RUN=1 mode, which checks exactly that launch with the dry run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = ["deepspeed_multinode.sh", "torchrun_multinode.sh", "slurm.sbatch"]
MODEL = "model.path=/nonexistent/Llama-3.1-8B"
HOSTFILE = "node1 slots=8\nnode2 slots=8\n# spare: node9 slots=8\nnode3 slots=8\nnode4 slots=8\n"

# Prints its name and arguments, one per line, instead of launching anything.
STAND_IN = '#!/usr/bin/env bash\necho "$(basename "$0")"; printf "%s\\n" "$@"\n'
SCONTROL = '#!/usr/bin/env bash\nprintf "gpu-a01\\ngpu-a02\\ngpu-a03\\ngpu-a04\\n"\n'


def run(script: str, tmp: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("deepspeed", STAND_IN), ("torchrun", STAND_IN), ("srun", STAND_IN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp / "hostfile").write_text(HOSTFILE)
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
            "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", **env}
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=tmp, env=full, capture_output=True, text=True,
                          timeout=300)


def default(script: str, name: str) -> str:
    return re.search(rf"{name}=\$\{{{name}:-([\w.]+)\}}", (LAUNCH / script).read_text()).group(1)


SLURM_ENV = {"SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu-a[01-04]",
             "SLURM_JOB_ID": "4242"}
LAUNCHES = {
    "deepspeed_multinode.sh": ({"HOSTFILE": "hostfile"},
                               ["deepspeed", "--hostfile", "hostfile", "--num_nodes", "4", "--num_gpus", "8",
                                "--master_addr", "node1", "--master_port", "29500", "--module", "moba_train"]),
    "torchrun_multinode.sh": ({"NNODES": "4", "MASTER_ADDR": "node1"},
                              ["torchrun", "--nnodes", "4", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                               "--rdzv_endpoint", "node1:29500", "--rdzv_id", "moba-llama3_8b_128k_to_1m",
                               "--max_restarts", "0", "-m", "moba_train"]),
    "slurm.sbatch": ({**SLURM_ENV, "SLURM_SUBMIT_DIR": str(ROOT)},
                     ["srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "4", "--nproc_per_node", "8",
                      "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-a01:29500", "--rdzv_id", "4242",
                      "--max_restarts", "0", "-m", "moba_train"]),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_command(tmp_path, script):
    env, expected = LAUNCHES[script]
    res = run(script, tmp_path, [MODEL], {**env, "MOBA_TRAIN_CACHE": "/shared/cache"})
    assert res.returncode == 0, res.stderr
    argv = res.stdout.split("\n")[:-1]
    recipe = default(script, "RECIPE")
    assert argv == [*expected, f"recipe={recipe}", MODEL]
    if script == "deepspeed_multinode.sh":
        lines = (tmp_path / ".deepspeed_env").read_text().splitlines()
        assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S.*", line) for line in lines)   # DeepSpeed splits on '='
        assert {"MOBA_TRAIN_CACHE=/shared/cache", "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
                "HF_HUB_OFFLINE=1"} <= set(lines)


def test_slurm_header_matches_its_fallbacks():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert re.search(r"#SBATCH --nodes=(\d+)", text).group(1) == re.search(r"SLURM_NNODES:-(\d+)", text).group(1)
    assert re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1) == \
        re.search(r"SLURM_GPUS_ON_NODE:-(\d+)", text).group(1)


DRY = {"deepspeed_multinode.sh": {"HOSTFILE": "hostfile"}, "torchrun_multinode.sh": {}, "slurm.sbatch": {}}


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_checks_the_launch(tmp_path, script):
    res = run(script, tmp_path, [MODEL], {**DRY[script], "DRY_RUN": "1"})
    recipe = default(script, "RECIPE")
    header = re.search(r"dry run: (\S+) on (\d+) node\(s\) x (\d+) GPU\(s\)", res.stdout)
    assert header, res.stdout + res.stderr
    assert header.groups() == (recipe, "4", "8")
    assert "FAIL" not in res.stdout                      # every divisibility rule holds for this launch
    assert res.returncode == (0 if "VERDICT: every rule holds" in res.stdout else 1)
    assert not (tmp_path / ".deepspeed_env").exists()    # nothing prepared for a launch that did not happen
