"""`moba-train recipe=NAME dry_run=true nodes=N gpus_per_node=G`: check a cluster recipe on this machine.

Nothing is trained and no weight is loaded: the model's architecture comes from its config.json
(model.path), model.config (source=config), or, when the weights are not on this machine, from a
table of public shapes (moba_train.trainer.public_shapes; `dry_run_model=NAME` picks one). The model
is built on the meta device to count its parameters. For every stage the dry run prints the
process-group layout, checks every divisibility rule, and estimates the memory of one GPU
(moba_train.trainer.memory_estimate), with a verdict against `gpu_memory_gib` (default 80).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moba_train.models import AttentionPlan
from moba_train.models.hf_compat import head_dim_of
from moba_train.schema import ConfigError

from moba_train.config import RunConfig, Stage

from .failures import explain_oom
from .memory_estimate import Estimate, Setup, Shape, estimate
from .public_shapes import PUBLIC_SHAPES, lookup

log = logging.getLogger(__name__)

TIGHT = 0.9                    # share of the GPU above which a stage is reported as tight


@dataclass(frozen=True)
class DryRunRequest:
    nodes: int
    gpus_per_node: int
    model: str | None = None            # a key of PUBLIC_SHAPES, overriding the recipe's model
    gpu_memory_gib: float = 80.0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Rule:
    stage: str
    name: str
    ok: bool | None                      # None: a warning (allowed, but worth knowing)
    detail: str


@dataclass
class DryRunReport:
    text: str
    rules: list[Rule] = field(default_factory=list)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    capacity_gib: float = 80.0

    @property
    def failed_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.ok is False]

    @property
    def stages_over(self) -> list[str]:
        return [name for name, e in self.estimates.items() if e.total > self.capacity_gib]

    @property
    def ok(self) -> bool:
        return not self.failed_rules and not self.stages_over


# ---------------------------------------------------------------------------------------- architecture
def resolve_architecture(cfg: RunConfig, request: DryRunRequest) -> tuple[dict | object, str]:
    """(a transformers config or a config mapping, where it came from)."""
    from transformers import AutoConfig

    m = cfg.model
    if request.model is not None:
        key = lookup(request.model)
        if key is None:
            raise ConfigError(f"dry_run_model={request.model!r} is not a known architecture; use one of "
                              f"{sorted(PUBLIC_SHAPES)}")
        return dict(PUBLIC_SHAPES[key]), f"built-in shape {key} (dry_run_model)"
    if m.source == "config":
        return dict(m.config), "model.config"
    if m.source in ("hf", "embedded"):
        path = Path(m.path).expanduser() if m.source == "hf" and m.path else \
            Path(cfg.paths.cache_dir).expanduser() / "models" / m.name
        if (path / "config.json").is_file():
            return AutoConfig.from_pretrained(path, local_files_only=True), f"{path / 'config.json'}"
    if m.source == "gguf" and m.path and Path(m.path).expanduser().is_file():
        gguf = Path(m.path).expanduser()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True), str(gguf)
    key = lookup(m.name)
    where = f"model.path {m.path!r}" if m.source in ("hf", "gguf") else f"the embedded model {m.name!r}"
    if key is None:
        raise ConfigError(f"{where} is not on this machine, and model.name {m.name!r} is not a known architecture: "
                          f"copy the model's config.json to a directory and set model.path to it, or pass "
                          f"dry_run_model=<one of {sorted(PUBLIC_SHAPES)}>")
    return dict(PUBLIC_SHAPES[key]), f"built-in shape {key} ({where} not found here; dry_run_model=... picks another)"


def model_shape(config) -> tuple[Shape, object]:
    """Parameter counts from the model built on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        config = dict(config)
        config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.get_decoder().layers[0].parameters())
    largest = max(model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel())
    heads = config.num_attention_heads
    shape = Shape(params=params, layer_params=layer, largest_module_params=largest, layers=config.num_hidden_layers,
                  hidden=config.hidden_size, intermediate=config.intermediate_size, heads=heads,
                  kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                  head_dim=head_dim_of(config),
                  vocab=config.vocab_size)
    return shape, config


# ---------------------------------------------------------------------------------------- per stage
def _dtype_bytes(cfg: RunConfig) -> int:
    return 4 if cfg.model.dtype == "float32" else 2          # auto: bf16 on GPUs


def _moba_topk(stage: Stage, layers: int) -> tuple[int | None, str]:
    plan = AttentionPlan.from_config(stage.attention, layers)
    starts = plan.phase_starts()
    moba = any(plan.at(i, p).mode == "moba" for p in starts for i in range(layers))
    return (plan.config.topk if moba else None), " then ".join(plan.describe(p) for p in starts)


def _sp_groups(world: int, sp: int, gpus_per_node: int) -> str:
    if sp == 1:
        return "none (each rank holds whole sequences)"
    groups = world // sp
    inside = sp <= gpus_per_node and gpus_per_node % sp == 0
    first = ", ".join(f"[{g * sp}-{g * sp + sp - 1}]" for g in range(min(groups, 2)))
    return f"{groups} x {sp} adjacent ranks ({first}{', ...' if groups > 2 else ''}), " + \
        ("inside nodes" if inside else "ACROSS nodes")


def check_stage(cfg: RunConfig, stage: Stage, shape: Shape, request: DryRunRequest
                ) -> tuple[list[Rule], dict, Estimate | None]:
    from moba_train.distributed.ulysses import kv_replication
    from moba_train.eval.passkey import passkey_lengths

    rules: list[Rule] = []
    world, sp = request.world, stage.sequence_parallel
    index = stage.index
    name = stage.name

    def rule(title: str, ok: bool | None, detail: str) -> None:
        rules.append(Rule(name, title, ok, detail))

    rule("sequence_parallel divides the ranks", world % sp == 0,
         f"{world} ranks / sp {sp}" + ("" if world % sp == 0 else
                                       f": launch a multiple of {sp} processes or change stages[{index}].sequence_parallel"))
    rule("seq_len divisible by sequence_parallel", stage.seq_len % sp == 0, f"{stage.seq_len} / {sp}")
    try:
        copies = kv_replication(sp, shape.heads, shape.kv_heads)
        rule("sequence_parallel divides the query heads", True, f"{shape.heads} heads / {sp}")
        rule("KV heads split evenly", None if copies > 1 else True,
             f"{shape.kv_heads} KV heads" + (f" replicated x{copies} (sp {sp} does not divide them: more memory and "
                                             f"all-to-all traffic)" if copies > 1 else f" over sp {sp}"))
    except ValueError as e:
        copies = 1
        rule("sequence_parallel divides the query heads", False, str(e))
    inside = sp <= request.gpus_per_node and request.gpus_per_node % sp == 0
    rule("sequence-parallel groups inside a node", True if inside else None,
         f"sp {sp}, {request.gpus_per_node} GPUs per node" + ("" if inside else
                                                              ": the all-to-alls cross the network (slow)"))
    try:
        topk, plan_text = _moba_topk(stage, shape.layers)
        rule("attention plan fits the model", True, plan_text)
    except ValueError as e:
        topk, plan_text = None, "-"
        rule("attention plan fits the model", False, str(e))
    block = stage.attention.block_size
    if topk is not None:
        rule("seq_len divisible by the MoBA block_size", stage.seq_len % block == 0, f"{stage.seq_len} / {block}")
    dp = world // sp if world % sp == 0 else 0
    steps = stage.total_steps(dp) if dp else 0
    per_step = stage.seq_len * stage.micro_batch_size * stage.grad_accum * dp
    if stage.tokens is not None and dp:
        rule("tokens make whole steps", True,
             f"{stage.tokens:,} tokens / {per_step:,} per step = {stage.tokens / per_step:,.2f} steps"
             + (f" (rounded up to {steps})" if stage.tokens % per_step else ""))
    cap = cfg.eval.passkey.max_length
    run, skipped = passkey_lengths(cfg.eval.passkey.lengths, stage.seq_len, cap)
    if stage.eval and cfg.eval.passkey.enabled:
        rule("passkey at the stage end", True if run else None,
             (f"lengths {run}" if run else "skipped") + (f"; {skipped} over eval.passkey.max_length {cap}"
                                                         if skipped else ""))
    if stage.eval_at and dp:
        points = stage.part_way_eval_steps(steps)
        rule("part-way evaluations", True, f"after steps {', '.join(map(str, points))} of {steps:,} (0: before the "
                                           f"stage's first step), each after a checkpoint of the steps before it")

    layout = {"stage": name, "seq_len": stage.seq_len, "sp": sp, "dp": dp,
              "groups": _sp_groups(world, sp, request.gpus_per_node) if dp else "-",
              "tokens_per_gpu": stage.micro_batch_size * stage.seq_len // sp,
              "heads": f"{shape.heads // sp if shape.heads % sp == 0 else '?'}/"
                       f"{shape.kv_heads * copies // sp if (shape.kv_heads * copies) % sp == 0 else '?'}",
              "batch_tokens": per_step, "steps": steps, "plan": plan_text}
    if any(r.ok is False for r in rules):
        return rules, layout, None
    setup = Setup(world=world, sp=sp, kv_copies=copies, micro_batch=stage.micro_batch_size, seq_len=stage.seq_len,
                  dtype_bytes=_dtype_bytes(cfg), zero_stage=cfg.deepspeed.zero_stage,
                  offload_optimizer=cfg.deepspeed.offload_optimizer, offload_params=cfg.deepspeed.offload_params,
                  checkpointing=cfg.model.activation_checkpointing, offload_activations=cfg.model.offload_activations,
                  checkpoint_every=cfg.model.checkpoint_every_n_layers,
                  tiled_mlp_chunks=cfg.model.tiled_mlp_chunks, loss_chunk_tokens=cfg.trainer.loss_chunk_tokens,
                  moba_topk=topk)
    return rules, layout, estimate(shape, setup)


# ---------------------------------------------------------------------------------------- report
def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _verdict(total: float, capacity: float) -> str:
    if total > capacity:
        return "DOES NOT FIT"
    return "tight" if total > TIGHT * capacity else "fits"


def dry_run(cfg: RunConfig, request: DryRunRequest) -> DryRunReport:
    if request.nodes < 1 or request.gpus_per_node < 1:
        raise ConfigError(f"dry run needs nodes >= 1 and gpus_per_node >= 1, got {request.nodes} x "
                          f"{request.gpus_per_node}")
    source_config, source = resolve_architecture(cfg, request)
    shape, _ = model_shape(source_config)
    ds = cfg.deepspeed
    dtype = "fp32" if _dtype_bytes(cfg) == 4 else "bf16"
    lines = [f"dry run: {cfg.run_name} on {request.nodes} node(s) x {request.gpus_per_node} GPU(s) = "
             f"{request.world} ranks, {request.gpu_memory_gib:g} GiB per GPU",
             f"model: {cfg.model.name} from {source}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, "
             f"{shape.heads} heads / {shape.kv_heads} KV heads of {shape.head_dim}, hidden {shape.hidden}, "
             f"MLP {shape.intermediate}, vocab {shape.vocab}",
             f"training: {dtype}, ZeRO-{ds.zero_stage} sharded over all {request.world} ranks, offload optimizer "
             f"{'yes' if ds.offload_optimizer else 'no'}, params {'yes' if ds.offload_params else 'no'}; activation "
             f"checkpointing {'yes' if cfg.model.activation_checkpointing else 'no'}"
             f"{' (inputs in host memory)' if cfg.model.offload_activations else ''}, tiled MLP "
             f"{cfg.model.tiled_mlp_chunks}, loss chunk {cfg.trainer.loss_chunk_tokens:,} tokens"]
    rules, layouts, estimates = [], [], {}
    for stage in cfg.stages:
        stage_rules, layout, est = check_stage(cfg, stage, shape, request)
        rules += stage_rules
        layouts.append(layout)
        if est is not None:
            estimates[stage.name] = est

    lines += ["", "process groups per stage (ZeRO and data parallelism span every rank; a data-parallel index is "
                  "rank // sp)",
              _table(["stage", "seq", "sp", "dp", "sequence-parallel groups", "tokens/GPU", "heads/GPU q/kv",
                      "tokens/step", "steps", "attention"],
                     [[x["stage"], f"{x['seq_len']:,}", str(x["sp"]), str(x["dp"]), x["groups"],
                       f"{x['tokens_per_gpu']:,}", x["heads"], f"{x['batch_tokens']:,}", f"{x['steps']:,}", x["plan"]]
                      for x in layouts])]
    mark = {True: "ok", None: "warn", False: "FAIL"}
    lines += ["", "rules", _table(["stage", "rule", "result", "detail"],
                                  [[r.stage, r.name, mark[r.ok], r.detail] for r in rules])]
    parts = ["weights", "gradients", "optimizer", "buckets", "activations", "attention", "loss", "optimizer step",
             "overhead"]
    rows = []
    for name, est in estimates.items():
        rows.append([name, *(f"{est.parts[p]:.1f}" for p in parts), f"{est.total:.1f}", f"{est.host_gib_per_rank:.1f}",
                     _verdict(est.total, request.gpu_memory_gib)])
    lines += ["", "memory per GPU, GiB (estimate, see moba_train/trainer/memory_estimate.py; total = weights to buckets "
                  "+ the larger of activations+attention+loss and the optimizer step + overhead)",
              _table(["stage", *parts, "total", "host/rank", f"verdict ({request.gpu_memory_gib:g} GiB)"], rows)]

    report = DryRunReport("", rules, estimates, request.gpu_memory_gib)
    lines.append("")
    if report.failed_rules:
        lines.append(f"VERDICT: {len(report.failed_rules)} rule(s) fail; fix them before launching:")
        lines += [f"  - {r.stage}: {r.name}: {r.detail}" for r in report.failed_rules]
    if report.stages_over:
        lines.append(f"VERDICT: stage(s) {', '.join(report.stages_over)} do not fit in {request.gpu_memory_gib:g} GiB "
                     f"per GPU.")
        worst = max(report.stages_over, key=lambda n: estimates[n].total)
        lines.append(explain_oom(cfg, next(s for s in cfg.stages if s.name == worst)).replace("out of memory",
                                                                                              "would run out of memory"))
    if report.ok:
        tight = [n for n, e in estimates.items() if e.total > TIGHT * request.gpu_memory_gib]
        lines.append(f"VERDICT: every rule holds and all {len(estimates)} stages fit in {request.gpu_memory_gib:g} GiB "
                     f"per GPU" + (f" ({', '.join(tight)} tight: over {TIGHT:.0%})" if tight else "") + ".")
    report.text = "\n".join(lines)
    return report

