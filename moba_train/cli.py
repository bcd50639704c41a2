"""`moba-train [recipe=NAME] [key=value ...]`: compose the Hydra config, check it, run the job.

Works the same started by hand, by `torchrun`, or by `deepspeed --module moba_train` (whose
`--local_rank=N` argument is taken here, since Hydra's parser would reject it).

Besides training, two modes, chosen by key=value arguments that are taken out before Hydra (they
say what to do with the config, they are not part of it):
  mode=eval checkpoint=PATH                    evaluations of an HF export or a training checkpoint
                                               (checkpoint=base: the recipe's untrained model)
  dry_run=true nodes=N gpus_per_node=G         check a cluster recipe on this machine (no GPU, no weights);
      [dry_run_model=NAME] [gpu_memory_gib=80]  exits 1 when a rule fails or a stage does not fit
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
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


@dataclass
class Invocation:
    """What to do with the composed config."""

    mode: str = "train"                # train | eval
    checkpoint: str | None = None      # mode=eval: an HF directory or a checkpoint directory
    dry_run: bool = False
    nodes: int | None = None           # dry_run: the cluster to check the recipe for
    gpus_per_node: int | None = None
    dry_run_model: str | None = None   # dry_run: a public architecture instead of the recipe's model
    gpu_memory_gib: float = 80.0       # dry_run: memory of one GPU

    def check(self) -> None:
        if self.mode not in ("train", "eval"):
            raise SystemExit(f"moba-train: mode={self.mode} is not one of train, eval")
        if (self.mode == "eval") != (self.checkpoint is not None):
            raise SystemExit("moba-train: mode=eval needs checkpoint=<hf directory or checkpoint directory>, and "
                             "checkpoint= is only used with mode=eval")
        if self.dry_run and self.mode == "eval":
            raise SystemExit("moba-train: dry_run=true checks a training launch; drop mode=eval")
        cluster = (self.nodes, self.gpus_per_node)
        if self.dry_run and None in cluster:
            raise SystemExit("moba-train: dry_run=true needs nodes=N and gpus_per_node=G (the cluster to check for)")
        if not self.dry_run and (cluster != (None, None) or self.dry_run_model is not None):
            raise SystemExit("moba-train: nodes=, gpus_per_node= and dry_run_model= only apply to dry_run=true; a real "
                             "launch takes its layout from the launcher (see docs/launch.md)")


INVOCATION_KEYS = {"mode": str, "checkpoint": str, "dry_run": bool, "nodes": int, "gpus_per_node": int,
                   "dry_run_model": str, "gpu_memory_gib": float}


def _parse_value(key: str, kind: type, text: str):
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise SystemExit(f"moba-train: {key}={text} is not true or false")
    try:
        return kind(text)
    except ValueError:
        raise SystemExit(f"moba-train: {key}={text} is not a valid {kind.__name__}") from None


def _split_invocation(argv: list[str]) -> tuple[Invocation, list[str]]:
    """Take the mode arguments (Invocation's fields as key=value) out of the Hydra overrides."""
    values, rest = {}, []
    for arg in argv:
        key, sep, text = arg.partition("=")
        if sep and key in INVOCATION_KEYS:
            values[key] = _parse_value(key, INVOCATION_KEYS[key], text)
        else:
            rest.append(arg)
    invocation = Invocation(**values)
    invocation.check()
    return invocation, rest


def _quiet_overrides() -> list[str]:
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _rank_overrides() -> list[str]:
    """Only rank 0 writes Hydra's files (.hydra/, the log) into the shared run directory."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return _quiet_overrides()


def run_job(cfg_dict: dict, invocation: Invocation | None = None):
    """Validate a composed config and run it (train, eval or dry run); every entry point ends here."""
    from moba_train.config import load_run_config

    invocation = invocation or Invocation()
    run_cfg = load_run_config(cfg_dict)
    if invocation.dry_run:
        from moba_train.trainer.dry_run import DryRunRequest, dry_run

        report = dry_run(run_cfg, DryRunRequest(invocation.nodes, invocation.gpus_per_node,
                                                invocation.dry_run_model, invocation.gpu_memory_gib))
        print(report.text, flush=True)
        return report
    if invocation.mode == "eval":
        from moba_train.eval.evaluate import evaluate_checkpoint

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("moba-train: mode=eval runs in one process; start it without a launcher")
        return evaluate_checkpoint(run_cfg, Path(invocation.checkpoint))
    import torch.distributed as dist

    from moba_train.trainer.run import train

    result = train(run_cfg)
    if dist.is_initialized():
        # Leaving with live gloo/NCCL threads can abort the process at exit ("terminate called without an
        # active exception"), turning a finished run into a failed one. Only after success: a rank that
        # failed must not wait here for the others.
        dist.barrier()
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> None:
    if not CONFIG_DIR.is_dir():
        sys.exit(f"moba-train: config directory {CONFIG_DIR} not found; install the project from its repository "
                 f"(pip install -e .) so that configs/ and recipes/ are next to the package")
    from moba_train.command_line import check_overrides, help_text, recipe_from_file

    argv = _split_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if any(a in ("--help", "-h") for a in argv):
        print(help_text(CONFIG_DIR))
        return
    invocation, argv = _split_invocation(argv)
    check_overrides(argv, CONFIG_DIR)
    argv = recipe_from_file(argv, CONFIG_DIR)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")

    import hydra
    from omegaconf import OmegaConf

    from moba_train.config import register_schema
    from moba_train.errors import UserError
    from moba_train.schema import ConfigError

    register_schema()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def _app(cfg) -> None:
        logging.getLogger("moba_train").setLevel(logging.INFO)
        # DeepSpeed's import probes its optional ops with test compiles, which distutils logs at INFO: noise
        logging.getLogger("compilers").setLevel(logging.WARNING)
        from moba_train.trainer.failures import RunStopped

        try:
            result = run_job(OmegaConf.to_container(cfg, resolve=True), invocation)
        except ConfigError as e:
            sys.exit(f"moba-train: configuration error: {e}")
        except UserError as e:           # bad data, a corrupt checkpoint, another model's checkpoint: the fix is named
            sys.exit(f"moba-train: {e}")
        except RunStopped as e:          # a signal stopped the run with nothing lost: not a failure
            print(f"moba-train: {e}", flush=True)
            sys.exit(0)
        except KeyboardInterrupt:        # a second Ctrl-C while a step or a checkpoint was under way
            sys.exit("moba-train: aborted by a second Ctrl-C; the newest complete checkpoint is kept, run the same "
                     "command again to resume from it")
        if invocation.dry_run and not result.ok:
            sys.exit(1)

    # Dry runs and evaluations write nothing into the run directory (an evaluation writes <output_dir>/eval/).
    quiet = invocation.dry_run or invocation.mode == "eval"
    sys.argv = [sys.argv[0], *argv, *(["hydra.run.dir=.", *_quiet_overrides()] if quiet else _rank_overrides())]
    _app()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
