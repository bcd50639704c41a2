"""Training throughput of a Llama-3-8B-shaped model: full attention vs MoBA, and the longest trainable context.

The model is built from its config with random weights under deepspeed.zero.Init (bf16, ZeRO-3, no
download), with activation checkpointing, the chunked loss, and Ulysses sequence parallelism; each step is
the trainer's own (moba_train.trainer.step.train_step) on one synthetic document as long as the pack, so
attention runs at the full length. Timed: forward + backward + optimizer, median after warm-up.

    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --sp 2 --seq-lens 32768 131072 --modes full moba
    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --sp 2 --longest moba_1m --search-from 131072

Modes: full; moba (block 512, top-8, last 3 layers full); moba_1m (block 4096, top-12, last 3 full: the
paper's 1M setting). Rank 0 prints JSON lines and a markdown table; --out appends the JSON lines to a file.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moba_train.distributed.groups import layout                               # noqa: E402
from moba_train.distributed.ulysses import apply_sequence_parallel, shard_batch  # noqa: E402
from moba_train.models import AttentionPlan, attach_plan                        # noqa: E402
from moba_train.tracking.flops import ModelShape, device_peak, step_flops       # noqa: E402
from moba_train.models.hf_compat import enable_activation_checkpointing  # noqa: E402
from moba_train.job.lm import PackedCausalLM                                 # noqa: E402
from moba_train.trainer.step import train_step                                   # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4 * 1024 * 1024,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0)

MODES = {
    "full": {"block_size": 512, "topk": 8, "moba_layers": "none"},
    "moba": {"block_size": 512, "topk": 8, "moba_layers": {"all_but_last": 3}},
    "moba_1m": {"block_size": 4096, "topk": 12, "moba_layers": {"all_but_last": 3}},
}


TINY = dict(LLAMA3_8B, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2)    # --tiny: a CPU check of the script itself

ON_GPU = torch.cuda.is_available()
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def build(args):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    ds_config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": ON_GPU, "check_grad_overflow": True}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1, "wall_clock_breakdown": False,
    }
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=DTYPE):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.config.use_cache = False
    enable_activation_checkpointing(model, every_n_layers=args.checkpoint_every, offload=args.offload_activations)
    if args.tiled_mlp > 1:
        from moba_train.models.tiled_mlp import tile_mlps
        tile_mlps(model, args.tiled_mlp)
    attach_plan(model, AttentionPlan.from_config(MODES["moba"], cfg["num_hidden_layers"]))
    apply_sequence_parallel(model, args.sp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=ON_GPU)
    engine, *_ = deepspeed.initialize(model=PackedCausalLM(model, args.loss_chunk), optimizer=opt, config=ds_config)
    return engine, model


def synthetic_pack(seq_len: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len + 1), generator=g)
    return {"input_ids": ids[:, :-1], "position_ids": torch.arange(seq_len)[None],
            "shift_labels": ids[:, 1:].clone(), "cu_seqlens": torch.tensor([0, seq_len], dtype=torch.int32),
            "max_seqlen": seq_len}


def measure(engine, model, args, seq_len: int, mode: str, steps: int, warmup: int) -> dict:
    lay = layout(args.sp)
    plan = AttentionPlan.from_config({**MODES[mode], "full_backend": args.full_backend}, model.config.num_hidden_layers)
    attach_plan(model, plan)
    apply_sequence_parallel(model, args.sp)
    pack = synthetic_pack(seq_len, model.config.vocab_size, seed=lay.dp_rank)
    times, result = [], None
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        result = train_step(engine, [shard_batch(pack, lay.sp_rank, args.sp)], grad_divisor=lay.world, clip=1.0)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = step_flops(ModelShape.of(model), [pack], plan) * lay.dp        # every data-parallel group's pack
    peak = device_peak(None, DTYPE, DEVICE)
    tokens = seq_len * lay.dp
    return {"mode": mode, "seq_len": seq_len, "sp": args.sp, "world": lay.world, "step_s": step_s,
            "tokens_per_s_per_gpu": tokens / step_s / lay.world, "step_tflop": flops / 1e12,
            "mfu": flops / step_s / (lay.world * peak.tflops * 1e12), "peak_tflops": peak.tflops,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if ON_GPU else None, "loss": result.loss,
            "skipped": result.skipped, "plan": plan.describe(), "layers": model.config.num_hidden_layers,
            "checkpoint_every": args.checkpoint_every, "offload_activations": args.offload_activations,
            "tiled_mlp": args.tiled_mlp,
            "device": torch.cuda.get_device_name() if ON_GPU else "cpu", "date": str(datetime.date.today())}


def agreed_oom(err: BaseException | None) -> bool:
    """Every rank learns whether any rank ran out of memory (so all move on together)."""
    flag = torch.tensor([1.0 if err is not None else 0.0], device=DEVICE)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def try_length(engine, model, args, seq_len, mode):
    """(row, None) when a step trained at seq_len, (None, what failed) when any rank ran out of memory."""
    err = None
    try:
        row = measure(engine, model, args, seq_len, mode, steps=1, warmup=0)
    except torch.OutOfMemoryError as e:
        err, row = e, None
        frames = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)]
        failure = {"error": str(e).split(". ")[0], "where": frames[-6:],
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if ON_GPU else None}
    if err is not None:
        engine.optimizer.zero_grad()     # drop what the failed step accumulated
    if ON_GPU:
        torch.cuda.empty_cache()
    return (None, failure if err is not None else {"error": "out of memory on another rank"}) \
        if agreed_oom(err) else (row, None)


def search_longest(engine, model, args) -> None:
    """One training step at growing lengths until one fails: --try-lengths as given, else doubling from
    --search-from up to --limit and then --refine bisection steps between the last success and the failure."""
    t0 = time.perf_counter()
    in_time = lambda: time.perf_counter() - t0 < args.time_budget      # noqa: E731

    def trains(length: int) -> bool:
        row, failure = try_length(engine, model, args, length, args.longest)
        emit(row or {"mode": args.longest, "seq_len": length, "sp": args.sp, "oom": True, **failure}, args)
        return row is not None

    doubling = itertools.takewhile(lambda n: n <= args.limit, (args.search_from << i for i in itertools.count()))
    best = worst = None
    for length in sorted(args.try_lengths) or doubling:
        if not in_time():
            break
        if not trains(length):
            worst = length
            break
        best = length
    block = MODES[args.longest]["block_size"] * args.sp
    for _ in range(args.refine if best and worst and not args.try_lengths else 0):
        mid = (best + worst) // 2 // block * block
        if mid in (best, worst) or not in_time():
            break
        best, worst = (mid, worst) if trains(mid) else (best, mid)
    emit({"mode": args.longest, "longest_trained": best, "first_oom": worst, "sp": args.sp,
          "search_seconds": time.perf_counter() - t0}, args)


def emit(row: dict, args) -> None:
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="*", default=[])
    p.add_argument("--modes", nargs="*", default=["full", "moba"], choices=sorted(MODES))
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--longest", choices=sorted(MODES), help="search the longest length that trains a step")
    p.add_argument("--search-from", type=int, default=131072, help="first length of the --longest search")
    p.add_argument("--limit", type=int, default=16 * 1024 * 1024)
    p.add_argument("--refine", type=int, default=2, help="bisection steps after the doubling search")
    p.add_argument("--try-lengths", type=int, nargs="*", default=[],
                   help="with --longest: try exactly these lengths, ascending, up to the first that fails")
    p.add_argument("--time-budget", type=float, default=1e9, help="stop the search after this many seconds")
    p.add_argument("--layers", type=int, default=0, help="override the layer count (quick checks)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: checks the script itself, e.g. on CPU")
    p.add_argument("--tiled-mlp", type=int, default=1)
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=1, help="recompute only every n-th layer (1: all)")
    p.add_argument("--full-backend", default="auto", help="the full-attention layers' backend (full_attn.py)")
    p.add_argument("--loss-chunk", type=int, default=8192)
    p.add_argument("--out")
    args = p.parse_args()

    from moba_train.trainer.engine import init_distributed
    init_distributed(timeout_s=int(os.environ.get("MOBA_BENCH_TIMEOUT", "300")))
    started = time.perf_counter()
    engine, model = build(args)
    if dist.get_rank() == 0:
        print(f"model built in {time.perf_counter() - started:.0f} s", flush=True)

    for seq_len in args.seq_lens:
        for mode in args.modes:
            try:
                emit(measure(engine, model, args, seq_len, mode, args.steps, args.warmup), args)
            except torch.OutOfMemoryError as e:    # one rank out of memory: the NCCL peers stop at the next collective
                emit({"mode": mode, "seq_len": seq_len, "sp": args.sp, "oom": True, "error": str(e).split(". ")[0],
                      "checkpoint_every": args.checkpoint_every}, args)
                raise

    if args.longest:
        search_longest(engine, model, args)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
