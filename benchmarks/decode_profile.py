"""Where an eager decoding step's time goes: a randomly initialised decoder of benchmarks/decode.py's shapes,
MobaKVCache, batch 1, dense (`decode: full`) against the sparse kernel (`decode: moba`, decode_backend=triton).

Per mode, in three alternating rounds: ms per step (synchronised after each, and issued back to back). Then per
mode: cProfile of 30 steps (top functions by own and by cumulative time), torch.profiler over 5 steps (CUDA
kernels per step, aten ops by host time) and its chrome trace (gaps between launches: open in chrome://tracing or
ui.perfetto.dev). Every phase decodes the same tokens from the prefill's end (the cache is cropped back). CUDA only:
    MODEL=smollm2-135m CTX=32768 OUT=/tmp/profile python benchmarks/decode_profile.py
    DEVICE=cpu MODEL=tiny CTX=2048 OUT=/tmp/profile python benchmarks/decode_profile.py     (a smoke run)
Writes cprofile_*, torchprof_* and trace_*.json under OUT. Results: docs/benchmarks.md ("The eager step, profiled").
"""
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import MODELS  # noqa: E402

from moba_train.models import AttentionPlan, MobaKVCache, attach_plan, build_from_config  # noqa: E402
from moba_train.models.hf_compat import model_cache_keyword, output_cache  # noqa: E402

MODEL = os.environ.get("MODEL", "smollm2-135m")
L = int(os.environ.get("CTX", "32768"))
STEPS = 30
OUT = os.environ.get("OUT", "/tmp")
DEVICE = os.environ.get("DEVICE", "cuda")          # cpu: a smoke run (fp32, the PyTorch decode ops)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def plan(model, decode):
    extra = {"decode": "full"} if decode == "full" else {"decode": "moba", "decode_backend": "auto"}  # triton on CUDA
    return AttentionPlan.from_config({"block_size": 512, "topk": 3, "moba_layers": "all", **extra},
                                     model.config.num_hidden_layers)


def main():
    cfg = {**MODELS[MODEL], "max_position_embeddings": L + 16 * STEPS + 64}
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = build_from_config(cfg, dtype=dtype, seed=0).to(DEVICE).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, L + 16 * STEPS + 8), device=DEVICE)
    attach_plan(model, plan(model, "moba"))
    kw = model_cache_keyword(model)
    cache = MobaKVCache.for_model(model, L + 16 * STEPS + 8)
    with torch.no_grad():
        out = model(input_ids=ids[:, :L], use_cache=True, logits_to_keep=1, **{kw: cache})
        cache = output_cache(out)

        def steps(n, sync_each):
            """n steps from the prefill's end; seconds per step (median when synchronised after each)."""
            times, t0 = [], time.perf_counter()
            for i in range(n):
                if sync_each:
                    sync(); t0 = time.perf_counter()
                model(input_ids=ids[:, L + i:L + i + 1], **{kw: cache}, use_cache=True)
                if sync_each:
                    sync(); times.append(time.perf_counter() - t0)
            sync()
            return statistics.median(times) if sync_each else (time.perf_counter() - t0) / n

        # Timings first, the modes alternating (the host's speed drifts: a drift shows as a round-to-round change).
        for rnd in range(3):
            for decode in ("full", "moba"):
                attach_plan(model, plan(model, decode))
                steps(3, True)
                cache.crop(-3)
                synced, pipelined = steps(STEPS, True), None
                cache.crop(-STEPS)
                pipelined = steps(STEPS, False)
                cache.crop(-STEPS)
                print(f"## round {rnd} {MODEL} {L // 1024}K decode={decode}: {1e3 * synced:.3f} ms/step synced, "
                      f"{1e3 * pipelined:.3f} ms/step pipelined", flush=True)
        for decode in ("full", "moba"):
            attach_plan(model, plan(model, decode))
            steps(3, True)
            cache.crop(-3)
            prof = cProfile.Profile()
            prof.enable()
            steps(STEPS, False)
            prof.disable()
            cache.crop(-STEPS)
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
            s2 = io.StringIO()
            pstats.Stats(prof, stream=s2).sort_stats("cumulative").print_stats(45)
            with open(f"{OUT}/cprofile_{MODEL}_{decode}.txt", "w") as f:
                f.write(s.getvalue() + "\n\n" + s2.getvalue())
            print("\n".join(s.getvalue().splitlines()[:25]))
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
            with profile(activities=activities) as p:
                steps(5, False)
            cache.crop(-5)
            ev = p.key_averages()
            kernels = sum(e.count for e in ev if e.device_type.name == "CUDA")
            print(f"CUDA kernel events per step: {kernels / 5:.0f}")
            table = ev.table(sort_by="self_cpu_time_total", row_limit=25)
            with open(f"{OUT}/torchprof_{MODEL}_{decode}.txt", "w") as f:
                f.write(table)
            p.export_chrome_trace(f"{OUT}/trace_{MODEL}_{decode}.json")
            print("\n".join(table.splitlines()[-3:]), flush=True)


if __name__ == "__main__":
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("decode_profile.py profiles CUDA decoding steps: run it on a CUDA device (DEVICE=cpu: a smoke run)")
    os.makedirs(OUT, exist_ok=True)
    main()
