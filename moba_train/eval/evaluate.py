"""`moba-train mode=eval checkpoint=PATH [recipe=NAME]`: the evaluations of a finished or running job, on demand.

PATH `base` is the recipe's model before any training (its own RoPE) with the recipe's last stage's
attention plan: the untrained baseline of an attention arm, at any length. Any other PATH is a Hugging Face directory (`<output_dir>/hf_model`, or any local model; an attention plan
recorded by the export is restored, else the recipe's last stage's plan is used) or a training
checkpoint (`<output_dir>/checkpoints/stepNNNNNNNN`; the recipe's model is built, the checkpoint's
weights loaded, and RoPE and attention plan set as they were at that step).

For every stage of the recipe with `eval: true`: validation loss by position at the stage's length on
its data mix (with the trailing-token loss); then passkey retrieval at `eval.passkey.lengths` (default:
every stage's length) up to the device's cap. Results go to <paths.output_dir>/eval/: metrics.jsonl and
the plots. One process; the model is not wrapped in DeepSpeed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moba_train.job.checkpoint_files import is_checkpoint, read_state
from moba_train.job.lm import PackedCausalLM
from moba_train.job.model_setup import compute_device, load_for_training, load_tokenizer, model_dtype
from moba_train.job.stage_data import build_stream
from moba_train.models import AttentionPlan, attach_plan, load_hf_dir, set_rope
from moba_train.schema import ConfigError
from moba_train.tracking.metrics_file import FILE_NAME, MetricsFile, read_records

from .passkey import PasskeyResult, describe, passkey_lengths, run_passkey
from .plots import PLOT_DIR, write_plots
from .position_loss import PositionLoss, evaluate_position_loss
from .stage_end import passkey_cap

log = logging.getLogger(__name__)

BASE = "base"          # checkpoint=base: the recipe's model before any training


@dataclass
class EvalResult:
    out_dir: Path
    position_loss: dict[str, PositionLoss] = field(default_factory=dict)
    passkey: list[PasskeyResult] = field(default_factory=list)   # one per haystack style
    plots: dict[str, Path] = field(default_factory=dict)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    plan: AttentionPlan
    source: str


def load_hf(cfg, path: Path) -> Loaded:
    loaded = load_hf_dir(path, dtype=model_dtype(cfg))
    plan = loaded.plan
    if plan is None:
        layers = loaded.model.config.num_hidden_layers
        plan = AttentionPlan.from_config(cfg.stages[-1].attention, layers)
        plan.set_progress(1.0)
        attach_plan(loaded.model, plan)
    tokenizer = loaded.tokenizer if loaded.tokenizer is not None else (
        load_tokenizer(cfg, cfg.model.tokenizer) if cfg.model.tokenizer else None)
    if tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer files; set model.tokenizer to a tokenizer directory or "
                          f"embedded:<name>")
    return Loaded(loaded.model, tokenizer, plan, f"Hugging Face directory {path}")


def load_base(cfg) -> Loaded:
    """The recipe's model as it is before training (its own RoPE), with the last stage's attention plan."""
    loaded = load_for_training(cfg)
    plan = AttentionPlan.from_config(cfg.stages[-1].attention, loaded.model.config.num_hidden_layers)
    plan.set_progress(1.0)
    attach_plan(loaded.model, plan)
    return Loaded(loaded.model, loaded.tokenizer, plan, f"the recipe's model before training ({cfg.model.source} "
                                                       f"{cfg.model.path or cfg.model.name})")


def _checkpoint_weights(ckpt: Path) -> dict:
    states = ckpt / "mp_rank_00_model_states.pt"
    if states.is_file():
        saved = torch.load(states, map_location="cpu", weights_only=False)
        zero3 = (saved.get("ds_config") or {}).get("zero_optimization", {}).get("stage") == 3
        if not zero3 and saved.get("module"):
            return saved["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def load_training_checkpoint(cfg, ckpt: Path) -> Loaded:
    """The recipe's model with the checkpoint's weights, RoPE and attention plan at the checkpoint's step."""
    state = read_state(ckpt)
    loaded = load_for_training(cfg)
    model = loaded.model
    weights = {k[len("lm."):]: v for k, v in _checkpoint_weights(ckpt).items() if k.startswith("lm.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {ckpt} does not match the recipe's model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}); pass the recipe the job was trained with")
    # The stage the weights belong to: a stage-end checkpoint points at the start of the next stage.
    index = state.stage_index - 1 if state.stage_step == 0 and state.stage_index > 0 else state.stage_index
    stage = cfg.stages[min(index, len(cfg.stages) - 1)]
    if stage.rope.changes_model:
        set_rope(model, theta=stage.rope.theta, scaling=stage.rope.scaling)
    plan = AttentionPlan.from_config(stage.attention, model.config.num_hidden_layers)
    if stage.index == state.stage_index:
        world = state.world.get("world", 1)
        total = stage.total_steps(max(1, world // stage.sequence_parallel))
        plan.set_progress(min(1.0, state.stage_step / total))
    else:
        plan.set_progress(1.0)
    attach_plan(model, plan)
    return Loaded(model, loaded.tokenizer, plan, f"training checkpoint {ckpt} (stage {stage.name}, global step "
                                                 f"{state.global_step})")


def evaluate_checkpoint(cfg, checkpoint: Path) -> EvalResult:
    checkpoint = checkpoint.expanduser()
    if str(checkpoint) == BASE:
        loaded = load_base(cfg)
    elif is_checkpoint(checkpoint):
        loaded = load_training_checkpoint(cfg, checkpoint)
    elif (checkpoint / "config.json").is_file():
        loaded = load_hf(cfg, checkpoint)
    else:
        raise ConfigError(f"checkpoint={checkpoint} is neither a Hugging Face model directory (config.json) nor a "
                          f"moba-train checkpoint (trainer_state.json); give <output_dir>/hf_model, "
                          f"<output_dir>/checkpoints/stepNNNNNNNN or {BASE} (the recipe's untrained model)")
    out_dir = Path(cfg.paths.output_dir).expanduser() / "eval"
    metrics = MetricsFile(out_dir / FILE_NAME)
    metrics.truncate_after(-1)                         # a fresh file: one evaluation per directory
    # The weights load on the CPU: left there on a GPU machine, the evaluation ran in bf16 on the CPU (~150x slower).
    device = compute_device()
    model = loaded.model.to(device)
    model.eval()
    print(f"evaluating {loaded.source} on {device}; attention {loaded.plan.describe()}; results in {out_dir}",
          flush=True)
    result = EvalResult(out_dir)
    module = PackedCausalLM(model, cfg.trainer.loss_chunk_tokens)
    metrics.append({"kind": "eval_source", "step": 0, "source": loaded.source, "plan": loaded.plan.describe(),
                    "device": str(device)})

    for stage in cfg.stages:
        if not stage.eval or cfg.trainer.eval_batches < 1:
            continue
        stream = build_stream(cfg, stage, loaded.tokenizer, 0, 1)
        batches = stream.validation_batches(max_packs=cfg.trainer.eval_batches * stage.micro_batch_size)
        ev = evaluate_position_loss(module, batches, stage.seq_len, buckets=cfg.eval.position_buckets,
                                    tail_tokens=cfg.eval.tail_tokens)
        result.position_loss[stage.name] = ev
        metrics.append({"kind": "eval", "step": 0, "stage_index": stage.index, "stage": stage.name, **asdict(ev)})
        tail = "-" if ev.tail_loss is None else f"{ev.tail_loss:.4f}"
        print(f"{stage.name}: validation loss {ev.mean_loss:.4f} over {ev.tokens:,} tokens at length "
              f"{stage.seq_len:,}, trailing {ev.tail_window:,} tokens {tail}", flush=True)

    pk = cfg.eval.passkey
    every_length = sorted({s.seq_len for s in cfg.stages})
    lengths, skipped = passkey_lengths(pk.lengths or every_length, None, passkey_cap(cfg))
    for style in pk.haystacks if lengths else ():
        found = run_passkey(model, loaded.tokenizer, lengths, pk.depths, samples=pk.samples, seed=pk.seed,
                            batch_tokens=pk.batch_tokens, haystacks=style)
        found.skipped_lengths = skipped
        result.passkey.append(found)
        metrics.append({"kind": "passkey", "step": 0, "stage": "eval", **asdict(found)})
        print(describe(found), flush=True)
    if not lengths and skipped:
        print(f"passkey skipped: lengths {skipped} exceed eval.passkey.max_length"
              f"{'' if torch.cuda.is_available() else '_cpu'} ({passkey_cap(cfg)})", flush=True)

    if cfg.eval.plots:
        result.plots = write_plots(read_records(metrics.path), out_dir / PLOT_DIR)
        for path in result.plots.values():
            print(f"plot: {path}", flush=True)
    return result
