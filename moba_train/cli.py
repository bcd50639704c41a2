"""`moba-train [recipe=NAME] [key=value ...]`: compose the Hydra config, check it, run the job.

Works the same started by hand, by `torchrun`, or by `deepspeed --module moba_train` (whose
`--local_rank=N` argument is taken here, since Hydra's parser would reject it).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _split_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local_rank N` (DeepSpeed's launcher) into LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            os.environ.setdefault("LOCAL_RANK", value)
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    return out


def _rank_overrides() -> list[str]:
    """Only rank 0 writes Hydra's files (.hydra/, the log) into the shared run directory."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def run_job(cfg_dict: dict):
    """Validate a composed config and run it; every entry point ends here."""
    from moba_train.trainer.config import load_run_config
    from moba_train.trainer.run import train

    run_cfg = load_run_config(cfg_dict)
    return train(run_cfg)


def main(argv: list[str] | None = None) -> None:
    if not CONFIG_DIR.is_dir():
        sys.exit(f"moba-train: config directory {CONFIG_DIR} not found; install the project from its repository "
                 f"(pip install -e .) so that configs/ and recipes/ are next to the package")
    argv = _split_launcher_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")

    import hydra
    from omegaconf import OmegaConf

    from moba_train.schema import ConfigError

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def _app(cfg) -> None:
        logging.getLogger("moba_train").setLevel(logging.INFO)
        try:
            run_job(OmegaConf.to_container(cfg, resolve=True))
        except ConfigError as e:
            sys.exit(f"moba-train: configuration error: {e}")

    sys.argv = [sys.argv[0], *argv, *_rank_overrides()]
    _app()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
