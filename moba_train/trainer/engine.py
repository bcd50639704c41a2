"""DeepSpeed: the process group, the generated config, and the engine around a model."""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import logging
import os
import socket
from pathlib import Path

import torch

from moba_train.schema import ConfigError

from moba_train.config import RunConfig, Stage
from moba_train.job.model_setup import model_dtype, on_gpu

log = logging.getLogger(__name__)


def init_distributed(timeout_s: int) -> None:
    """Join the job's process group (gloo on CPU, NCCL on GPUs); a lone process gets a group of one."""
    import deepspeed

    if not os.environ.get("RANK"):
        # Started without a launcher: make the environment a launcher would have made.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # On CPU, DeepSpeed loads its shared-memory collective op and prints that it "built successfully" at every
    # start: noise, kept out of the console (errors still raise).
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo",
                                   timeout=datetime.timedelta(seconds=timeout_s), verbose=False)


def deepspeed_config(cfg: RunConfig, stage: Stage, load_universal: bool = False) -> dict:
    """The engine's JSON: a user's file if given, else generated; batch sizes always follow the stage."""
    ds = cfg.deepspeed
    if ds.config_file:
        path = Path(ds.config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"deepspeed.config_file {path} does not exist; give a DeepSpeed JSON or drop the key")
        try:
            out = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config_file {path} is not valid JSON: {e}") from None
        for key in ("optimizer", "scheduler"):
            if key in out:
                raise ConfigError(f"deepspeed.config_file {path} sets '{key}'; moba-train drives the optimizer and "
                                  f"the per-stage LR itself: remove '{key}' from the JSON")
    else:
        zero: dict = {"stage": ds.zero_stage}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu()}
        if ds.zero_stage == 3:
            zero.update(stage3_gather_16bit_weights_on_model_save=True)
        bf16 = model_dtype(cfg) == torch.bfloat16
        out = {
            "zero_optimization": zero,
            "gradient_clipping": cfg.trainer.grad_clip,
            # bf16 needs the overflow check to skip a step with NaN/inf gradients (fp32 ZeRO always checks)
            "bf16": {"enabled": bf16, "check_grad_overflow": True} if bf16 else {"enabled": False},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        out = _deep_merge(out, ds.overrides)
    out = copy.deepcopy(out)
    out["train_micro_batch_size_per_gpu"] = stage.micro_batch_size
    out["gradient_accumulation_steps"] = stage.grad_accum
    out.pop("train_batch_size", None)
    out["zero_allow_untested_optimizer"] = True        # torch's AdamW: no JIT-built DeepSpeed optimizer
    if out.get("zero_optimization", {}).get("offload_optimizer"):
        out["zero_force_ds_cpu_optimizer"] = False
    if out.get("zero_optimization", {}).get("stage", 0) == 0:
        out["gradient_clipping"] = 0.0      # the trainer clips stage-0 gradients itself (step._zero0_boundary)
    if load_universal:
        out.setdefault("checkpoint", {})["load_universal"] = True
    return out


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    """trainer.optimizer instantiated over two groups: weight decay on matrices, none on biases and norms.
    torch's AdamW/Adam get their fused kernel on GPUs (not with CPU offload, whose step runs on the host)."""
    from hydra.utils import get_class, instantiate

    spec = dict(cfg.trainer.optimizer)
    weight_decay = spec.pop("weight_decay", 0.0)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if get_class(spec["_target_"]) in (torch.optim.AdamW, torch.optim.Adam) and "fused" not in spec:
        spec["fused"] = on_gpu() and not cfg.deepspeed.offload_optimizer
    return instantiate(spec, groups, lr=lr, _convert_="all")


def build_engine(model, cfg: RunConfig, stage: Stage, mpu=None, load_universal: bool = False):
    import deepspeed

    optimizer = make_optimizer(model, cfg, stage.lr.peak)
    config = deepspeed_config(cfg, stage, load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def set_stage_batch(engine, stage: Stage, dp_size: int) -> None:
    """Point DeepSpeed's accumulation boundary at this stage's micro-batch x grad_accum."""
    engine.set_train_micro_batch_size(stage.micro_batch_size)
    engine.set_train_batch_size(stage.micro_batch_size * stage.grad_accum * dp_size)
