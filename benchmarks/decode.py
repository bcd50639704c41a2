"""Decode tokens/s over a long KV cache: MoBA layers decoding densely (`full`, the paper's setting) or
sparsely (`moba`: own block + top-(k-1) blocks by the block means kept with the cache), the sparse step run by
PyTorch ops (`moba`) or by the fused Triton kernel (`moba-triton`, decode_backend=triton; CUDA only), or, at
the attention level, by `DeviceDecodeLayer` (`moba-device`: the kernel with the cache's length and block means
on the device, one token appended per step, so that one CUDA graph replays every step; CUDA only).

Two levels per context length L:
  attention  one layer's attention for one new token over a cache of L keys (random q/k/v): the part
             the decode mode changes. For `moba` the first call, which builds the block means from the
             whole cache, is reported apart ("state build"). ms/step (one token for each of --batch rows)
             synchronises after every step (host time included); tokens/s counts every row's token;
             "pipelined" issues --steps steps back to back and synchronises once; "graph" (CUDA) replays
             one step captured in a CUDA graph: the device's time alone; "graph sync" the same replays timed on
             the host with a synchronisation after each (what a graph-replayed decoding loop pays per step).
             `full`, `moba` and `moba-triton` replay a step at one cache length; `moba-device` appends a token
             at every step, replays included (its cache grows from L by a few dozen tokens). With --growing,
             `full`, `moba` and `moba-triton` also see one more key per step (views of a preallocated buffer,
             as MobaKVCache hands them to attention in generate); no graph columns then.
  model      a whole decoding step of a randomly initialised decoder (forward of one token, every layer
             MoBA) after a MoBA prefill of L tokens: what generate() pays per token, with each KV cache
             class of --caches: `dynamic` (transformers' DynamicCache, which appends by concatenation,
             i.e. copies the whole cache every step whatever the decode mode) and `moba` (moba-train's
             MobaKVCache: allocated once, appended in place). "vs full" compares within one cache class.
             `full-graph` and `moba-graph` (CUDA, MobaKVCache): whole greedy steps replayed from one CUDA
             graph (`models.graph_decode.DecodingSteps`), dense or with the kernel, synchronised after every
             replay; their "vs full" compares moba-graph with full-graph. Greedy, or with --sample each token
             drawn as sample_decode draws it (temperature 0.7, top-p 0.9).

CPU (small, fp32):
    python benchmarks/decode.py --device cpu --contexts 2048 8192 --model tiny --heads 8 2 --head-dim 64
GPU (the sizes of docs/benchmarks.md; --model llama3-8b-8l or llama3.2-1b for larger decoders):
    python benchmarks/decode.py --device cuda --dtype bf16 --contexts 32768 131072
Prints a markdown table; --out appends JSON lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from datetime import date

import torch
from transformers import DynamicCache

from moba_train.models import AttentionPlan, LayerAttention, MobaKVCache, Sampling, attach_plan, build_from_config
from moba_train.models.cached_attention import attend_cached
from moba_train.models.decode_cache import BlockMeans
from moba_train.models.device_decode import DeviceDecodeLayer
from moba_train.models.graph_decode import DecodingSteps
from moba_train.models.hf_compat import model_cache_keyword, output_cache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# decode mode, and for sparse decoding what runs the step. moba-device is one layer's step (attention level);
# full-graph and moba-graph are whole model steps replayed from a CUDA graph (model level, MobaKVCache, CUDA).
MODES = ("full", "moba", "moba-triton", "moba-device", "full-graph", "moba-graph")
ATTENTION_MODES = ("full", "moba", "moba-triton", "moba-device")
MODEL_MODES = ("full", "moba", "moba-triton", "full-graph", "moba-graph")
GRAPH_MODES = {"full-graph": "full", "moba-graph": "moba-triton"}   # the eager mode whose plan each replays


def layer_settings(mode: str) -> dict:
    """The plan's decode keys of a benchmark mode."""
    mode = GRAPH_MODES.get(mode, mode)
    return {"decode": "full"} if mode == "full" else {"decode": "moba",
                                                      "decode_backend": "triton" if mode == "moba-triton" else "torch"}
MODELS = {
    # SmolLM2-135M's shape (the demo model): 30 layers, 9 query / 3 KV heads of 64, vocabulary 49,152.
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # Llama-3.2-1B's shape: 16 layers, 32 query / 8 KV heads of 64, vocabulary 128,256.
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        tie_word_embeddings=True),
    # Llama-3-8B's layer shape, 8 of its 32 layers: 32 query / 8 KV heads of 128, vocabulary 128,256.
    "llama3-8b-8l": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def bench_attention(L: int, mode: str, args) -> dict:
    dtype, dev = DTYPES[args.dtype], args.device
    hq, hkv = args.heads
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(args.batch, hq, 1, args.head_dim, generator=g, device=dev, dtype=dtype)
    k, v = (torch.randn(args.batch, hkv, L, args.head_dim, generator=g, device=dev, dtype=dtype) for _ in range(2))
    if mode == "moba-device":
        # The prefill holds L - 1 tokens; the first step appends the L-th. Room for every step below.
        appended = args.warmup + 4 * args.steps + 4
        device_layer = DeviceDecodeLayer.from_prefill(k[:, :, :L - 1], v[:, :, :L - 1], L - 1 + appended,
                                                       args.block_size, args.topk)
        k_new, v_new = k[:, :, L - 1:].clone(), v[:, :, L - 1:].clone()

        def step():
            return device_layer.step(q, k_new, v_new)
    else:
        layer = LayerAttention("moba", args.block_size, args.topk, "auto", **layer_settings(mode))
        means = BlockMeans(args.block_size) if mode != "full" else None
        if args.growing:
            # Views of preallocated buffers that grow by one key per step, as MobaKVCache hands them to attention.
            room = L + args.warmup + 2 * args.steps + 2
            k_buf, v_buf = (torch.randn(args.batch, hkv, room, args.head_dim, generator=g, device=dev, dtype=dtype)
                            for _ in range(2))
            filled = [L - 1]

            def step():
                filled[0] += 1
                return attend_cached(q, k_buf[:, :, :filled[0]], v_buf[:, :, :filled[0]], None, layer, None, means)
        else:
            def step():
                return attend_cached(q, k, v, None, layer, None, means)

    with torch.no_grad():
        build = timed(step, dev)
        for _ in range(args.warmup):
            step()
        reset_peak(dev)
        times = [timed(step, dev) for _ in range(args.steps)]
        # Steps issued back to back, one synchronisation at the end: what a decoding loop that does not wait on
        # each step pays (the larger of the host's launch time and the device's time).
        pipelined = timed(lambda: [step() for _ in range(args.steps)], dev) / args.steps
        # A graph replays one length: not what --growing measures.
        graph, graph_sync = graph_seconds(step, args) if dev == "cuda" and not args.growing else (None, None)
    ms = 1e3 * statistics.median(times)
    return {"level": "attention", "context": L, "decode": mode, "ms_per_step": ms,
            "tokens_per_s": args.batch * 1e3 / ms,
            "pipelined_ms": 1e3 * pipelined, "graph_ms": None if graph is None else 1e3 * graph,
            "graph_sync_ms": None if graph_sync is None else 1e3 * graph_sync,
            "state_build_ms": 1e3 * build if mode not in ("full", "moba-device") else None, "peak_gib": peak_gib(dev)}


def graph_seconds(step, args) -> tuple[float, float]:
    """One step replayed from a CUDA graph: the device's time (CUDA events, no host work in it) and the host's
    wall time of a replay and a synchronisation; medians over --steps replays each."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                        # warm-up on a side stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(walls)


def plan_for(model, mode: str, args) -> AttentionPlan:
    return AttentionPlan.from_config({"block_size": args.block_size, "topk": args.topk, "moba_layers": "all",
                                      **layer_settings(mode)}, model.config.num_hidden_layers)


def bench_model(L: int, args) -> list[dict]:
    dev = args.device
    cfg = {**MODELS[args.model], "max_position_embeddings": L + args.warmup + args.steps + 16}
    model = build_from_config(cfg, dtype=DTYPES[args.dtype], seed=0).to(dev).eval()
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, L + args.warmup + args.steps), generator=g).to(dev)
    attach_plan(model, plan_for(model, "moba", args))
    rows = []
    cache_kw = model_cache_keyword(model)
    for cache_class in args.caches:
        rows += _bench_model_cache(model, ids, L, cache_class, cache_kw, args)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return rows


def _bench_model_cache(model, ids, L: int, cache_class: str, cache_kw: str, args) -> list[dict]:
    dev = args.device
    attach_plan(model, plan_for(model, "moba", args))
    room = L + args.warmup + args.steps + 2           # + 2: a graph mode's eager and captured steps
    rows = []
    with torch.no_grad():
        out = {}
        prefill = timed(lambda: out.update(o=prefill_cache(model, ids[:, :L], cache_class, room, cache_kw,
                                                           args.prefill_rows)), dev)
        last_logits, cache = out.pop("o")
        for mode in [m for m in args.modes if m in MODEL_MODES]:
            attach_plan(model, plan_for(model, mode, args))
            if mode in GRAPH_MODES:
                if cache_class == "moba" and dev == "cuda":
                    rows.append(_bench_model_graph(model, cache, last_logits, L, mode, prefill, args))
                continue

            def step(t):
                model(input_ids=ids[:, t:t + 1], **{cache_kw: cache}, use_cache=True)

            for t in range(L, L + args.warmup):
                step(t)
            reset_peak(dev)
            times = [timed(lambda: step(t), dev) for t in range(L + args.warmup, L + args.warmup + args.steps)]
            cache.crop(-(args.warmup + args.steps))   # back to the prefill for the next mode
            ms = 1e3 * statistics.median(times)
            rows.append({"level": f"model/{cache_class}", "model": args.model, "cache": cache_class, "context": L,
                         "decode": mode, "ms_per_step": ms, "tokens_per_s": args.batch * 1e3 / ms, "prefill_s": prefill,
                         "peak_gib": peak_gib(dev)})
    del cache, last_logits
    return rows


def new_cache(model, cache_class: str, room: int):
    return MobaKVCache.for_model(model, room) if cache_class == "moba" else DynamicCache(config=model.config)


def prefill_cache(model, ids, cache_class: str, room: int, cache_kw: str, by_rows: bool):
    """(the last position's logits [B, vocab], a KV cache of `cache_class` holding the prompts `ids` [B, L]).
    `by_rows`: each row is prefilled alone and the rows' caches are stacked, for batches whose joint prefill does not
    fit (its activations grow with B x L; the stacked cache costs two caches' memory for a moment)."""
    def run(rows):
        out = model(input_ids=rows, use_cache=True, logits_to_keep=1, **{cache_kw: new_cache(model, cache_class, room)})
        return out.logits[:, -1], output_cache(out)

    if not by_rows:
        return run(ids)
    logits, caches = zip(*[run(ids[b:b + 1]) for b in range(ids.shape[0])])
    stacked = new_cache(model, cache_class, room)
    for i in range(len(caches[0].layers)):
        stacked.update(torch.cat([c.layers[i].keys for c in caches]), torch.cat([c.layers[i].values for c in caches]), i)
    return torch.cat(logits), stacked


def _bench_model_graph(model, cache, last_logits, L: int, mode: str, prefill_s: float, args) -> dict:
    """Whole model steps replayed from one CUDA graph (`graph_decode.DecodingSteps`: the cache's lengths and block
    means on the device), continuing the prefill in `cache`; synchronised after every replay."""
    last = torch.full((args.batch, 1), L - 1, device=args.device)
    sampling = Sampling(temperature=0.7, top_p=0.9) if args.sample else None
    decoding = DecodingSteps(model, cache, last_logits, last, args.warmup + args.steps + 2, sampling=sampling)
    decoding.capture()
    for _ in range(args.warmup):
        decoding.replay()
    reset_peak(args.device)
    times = [timed(decoding.replay, args.device) for _ in range(args.steps)]
    ms = 1e3 * statistics.median(times)
    return {"level": "model/moba", "model": args.model, "cache": "moba", "context": L, "decode": mode,
            "ms_per_step": ms, "tokens_per_s": args.batch * 1e3 / ms, "prefill_s": prefill_s,
            "peak_gib": peak_gib(args.device)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192], help="tokens in the cache")
    p.add_argument("--levels", nargs="+", default=["attention", "model"], choices=["attention", "model"])
    p.add_argument("--modes", nargs="+", default=None, choices=MODES,
                   help="default: all on cuda; full and moba on cpu (the kernel needs a GPU)")
    p.add_argument("--caches", nargs="+", default=["dynamic", "moba"], choices=["dynamic", "moba"],
                   help="model level: the KV cache classes")
    p.add_argument("--model", default=None, choices=sorted(MODELS), help="default: smollm2-135m on cuda, tiny on cpu")
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"), help="attention level")
    p.add_argument("--head-dim", type=int, default=128, help="attention level")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="rows decoding together (both levels)")
    p.add_argument("--sample", action="store_true",
                   help="model level: the graph modes draw each token (temperature 0.7, top-p 0.9: sample_decode's "
                        "step) instead of taking the argmax")
    p.add_argument("--prefill-rows", action="store_true",
                   help="model level: prefill each row alone and stack the caches (a batch whose joint prefill "
                        "does not fit, e.g. llama3-8b-8l at 4 x 128K on 80 GB)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed decoding steps (the median is reported)")
    p.add_argument("--growing", action="store_true",
                   help="attention level: every step sees one more key (views of a preallocated cache, as in generate) "
                        "instead of replaying one length; no graph columns")
    p.add_argument("--out", help="append JSON lines here")
    args = p.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.model = args.model or ("smollm2-135m" if args.device == "cuda" else "tiny")
    args.modes = args.modes or (list(MODES) if args.device == "cuda" else ["full", "moba"])
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    for L in args.contexts:
        if L < args.block_size * args.topk:
            p.error(f"context {L} < block_size x topk = {args.block_size * args.topk}: MoBA would attend everything")
    logging.getLogger("moba_train.models.decode_cache").setLevel(logging.ERROR)   # the crop between modes

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    header = {"date": str(date.today()), "argv": sys.argv[1:], "torch": torch.__version__, "device": device_name,
              "dtype": args.dtype, "block_size": args.block_size, "topk": args.topk, "batch": args.batch,
              "sample": args.sample}
    print(f"# {json.dumps(header)}")
    print(f"attention level: heads {args.heads[0]}/{args.heads[1]} x {args.head_dim}; model level: {args.model}")
    if "attention" in args.levels:
        # Untimed pass at the longest context: otherwise the first cases of a process pay one-off costs
        # (lazy inits; on CPU, glibc's mmap threshold, which rises only once large blocks have been freed).
        for mode in [m for m in args.modes if m in ATTENTION_MODES]:
            bench_attention(max(args.contexts), mode, args)
    print("| context | level | decode | ms/step | tokens/s | vs full | pipelined ms | graph ms | graph vs full "
          "| graph sync ms | graph sync vs full | state build ms | prefill s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for L in args.contexts:
        rows = []
        if "attention" in args.levels:
            rows += [bench_attention(L, mode, args) for mode in args.modes if mode in ATTENTION_MODES]
        if "model" in args.levels:
            rows += bench_model(L, args)
        full = {r["level"]: r for r in rows if r["decode"] == "full"}
        full_graph = {r["level"]: r for r in rows if r["decode"] == "full-graph"}
        for r in rows:
            base = (full_graph if r["decode"] in GRAPH_MODES else full).get(r["level"])   # graph vs graph
            ratio = f"{base['ms_per_step'] / r['ms_per_step']:.2f}x" if base else ""
            graph_ratio = f"{base['graph_ms'] / r['graph_ms']:.2f}x" if base and r.get("graph_ms") else ""
            sync_ratio = (f"{base['graph_sync_ms'] / r['graph_sync_ms']:.2f}x" if base and r.get("graph_sync_ms")
                          else "")
            cells = [f"{L // 1024}K" if L % 1024 == 0 else str(L), r["level"], r["decode"], f"{r['ms_per_step']:.3f}",
                     f"{r['tokens_per_s']:.0f}", ratio,
                     "" if r.get("pipelined_ms") is None else f"{r['pipelined_ms']:.3f}",
                     "" if r.get("graph_ms") is None else f"{r['graph_ms']:.3f}", graph_ratio,
                     "" if r.get("graph_sync_ms") is None else f"{r['graph_sync_ms']:.3f}", sync_ratio,
                     "" if r.get("state_build_ms") is None else f"{r['state_build_ms']:.1f}",
                     "" if r.get("prefill_s") is None else f"{r['prefill_s']:.2f}",
                     "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**header, **r}) + "\n")


if __name__ == "__main__":
    main()
