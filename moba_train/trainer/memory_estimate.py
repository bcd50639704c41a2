"""Per-GPU memory of one training stage, estimated from the model's shape (no weights, no GPU).

An estimate to catch a stage that cannot fit before a cluster job starts, not an exact account.
Bytes per parameter P (b = 2 in bf16, 4 in fp32; N = all ranks: ZeRO shards over every rank whatever
the sequence parallelism). Held throughout:

  weights      P*b, /N under ZeRO-3; 0 with offload_params. ZeRO-3 also holds the gathered weights it
               is working on: 2 decoder layers or the largest single module (embedding / LM head).
  gradients    P*b in the model's dtype, /N under ZeRO-2/3; DeepSpeed's bf16 optimizer without ZeRO
               also accumulates fp32 gradients (P*4).
  optimizer    Adam moments (8 bytes) plus the fp32 master copy in bf16 (4 bytes); /N from ZeRO-1;
               0 on the GPU with offload_optimizer (reported as host memory instead).
  buckets      DeepSpeed's gradient reduce bucket (reduce_bucket_size 5e8 elements) under ZeRO-1/2/3.

Then the larger of two phases (their columns are both shown; only the larger one counts in the total):

  forward/backward, with t = micro_batch * seq_len / sp tokens per GPU:
    activations  with activation checkpointing, each layer's input (t*h*b; in host memory with
                 offload_activations; only every n-th layer's with checkpoint_every_n_layers, the others
                 keep all their tensors) plus one recomputed layer's tensors (norms and their fp32 upcast,
                 q/k/v, attention output, the MLP intermediate / tiled_mlp_chunks) and a quarter more for
                 their gradients;
                 without checkpointing, every layer's tensors.
    attention    the whole sequence for Hq/sp heads: log-sum-exp (fp32), MoBA's chosen block ids (int64,
                 topk-1 per query and head) and its gate's score chunk; Ulysses all-to-all buffers.
    loss         one chunk of loss_chunk_tokens logits (model dtype, fp32, log-softmax, its gradient) and
                 the last hidden state with its gradient.
  optimizer step: the fp32 gradient partition (ZeRO-1/2: P*4/N; ZeRO-3: one sub-group, at most 1e9
                 elements) that DeepSpeed builds for Adam.

  overhead     CUDA context, NCCL buffers, allocator fragmentation: 2.5 GiB + 5% of the rest.

Calibration (H200, Llama-3-8B shape, bf16, ZeRO-3, checkpointing, loss chunk 8192, docs/benchmarks.md): the
estimate without overhead against torch.cuda.max_memory_allocated, full / MoBA: 2 GPUs sp 2 at 32K 80.9 / 80.9
vs 80.1 / 80.9 GiB, at 128K 103.0 / 103.1 vs 95.4 / 98.7 GiB; 4 GPUs sp 4 at 128K (MoBA) 58.4 vs 56.5 GiB. At 1M
on 2 GPUs (sp 2, offloaded activations, MLP in 8 tiles) it gives 146 GiB with overhead: the run ran out of
memory on 141 GiB H200s.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
REDUCE_BUCKET_ELEMENTS = 5e8          # DeepSpeed's default reduce_bucket_size
FIXED_OVERHEAD_GIB = 2.5
FRAGMENTATION = 0.05
ROUTING_CHUNK_BYTES = (1 << 23) * 4   # MoBA gate scores for a chunk of queries (moba_train.ops.moba.routing)
SUB_GROUP_ELEMENTS = 1e9              # DeepSpeed ZeRO-3's default sub_group_size
GRADIENT_SHARE = 1.25                 # a recomputed layer's tensors plus the gradients in flight


@dataclass(frozen=True)
class Shape:
    params: int
    layer_params: int            # one decoder layer
    largest_module_params: int   # embedding or LM head
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class Setup:
    world: int
    sp: int
    kv_copies: int               # KV heads replicated so that sp splits them evenly
    micro_batch: int
    seq_len: int
    dtype_bytes: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    checkpointing: bool
    offload_activations: bool
    tiled_mlp_chunks: int
    loss_chunk_tokens: int
    moba_topk: int | None        # None: no MoBA layer in the stage
    checkpoint_every: int = 1    # with checkpointing: only every n-th layer recomputes, the others keep everything


@dataclass
class Estimate:
    parts: dict[str, float]      # GiB on each GPU
    host_gib_per_rank: float     # host memory each rank needs for what is offloaded
    total: float                 # GiB at the peak: held + the larger phase + overhead


def estimate(shape: Shape, s: Setup) -> Estimate:
    b, P, N = s.dtype_bytes, shape.params, s.world
    bf16 = b == 2
    parts: dict[str, float] = {}
    host = 0.0

    weights = P * b / (N if s.zero_stage == 3 else 1)
    if s.offload_params:
        host += weights
        weights = 0.0
    if s.zero_stage == 3:
        weights += max(2 * shape.layer_params, shape.largest_module_params) * b
    parts["weights"] = weights
    parts["gradients"] = P * b / (N if s.zero_stage >= 2 else 1) + (P * 4 if bf16 and s.zero_stage == 0 else 0)
    optim = P * (12 if bf16 else 8) / (N if s.zero_stage >= 1 else 1)
    if s.offload_optimizer:
        host += optim
        optim = 0.0
    parts["optimizer"] = optim
    parts["buckets"] = REDUCE_BUCKET_ELEMENTS * b if s.zero_stage >= 1 else 0.0

    t = s.micro_batch * s.seq_len / s.sp
    h, inter = shape.hidden, shape.intermediate
    q_width = shape.heads * shape.head_dim
    kv_width = shape.kv_heads * s.kv_copies * shape.head_dim
    layer_tensors = (t * (4 * h + q_width + 2 * kv_width + 3 * inter / max(1, s.tiled_mlp_chunks)) * b
                     + t * h * 4)                               # RMSNorm's fp32 upcast of the hidden state
    # what autograd saves in a layer that is not recomputed (HF eager Llama): both RMSNorms' fp32 input and
    # normalized copies plus their output, q/k/v and the pre-RoPE q/k, the attention output, and the MLP's
    # gate, up, SiLU and product. Measured on 2 H200s (8B, 32K, sp 2): every 2nd layer checkpointed ran out
    # of memory at 137 GiB, which the smaller per-layer working set above put at 123.
    saved_layer = t * (16 * h + b * (2 * h + 3 * q_width + 3 * kv_width + 4 * inter / max(1, s.tiled_mlp_chunks)))
    if s.checkpointing:
        recomputed = -(-shape.layers // s.checkpoint_every)       # layers 0, n, 2n, ... recompute
        kept = recomputed * t * h * b
        if s.offload_activations:
            host += kept
            kept = 0.0
        activations = kept + (shape.layers - recomputed) * saved_layer + GRADIENT_SHARE * layer_tensors
    else:
        activations = shape.layers * saved_layer + GRADIENT_SHARE * layer_tensors
    parts["activations"] = activations

    heads_here = shape.heads / s.sp
    full_tokens = s.micro_batch * s.seq_len                       # attention sees the whole sequence
    workspace = full_tokens * heads_here * 4 * 2                  # lse forward + delta backward (fp32)
    if s.moba_topk is not None:
        workspace += full_tokens * heads_here * max(0, s.moba_topk - 1) * 8 + ROUTING_CHUNK_BYTES
    if s.sp > 1:
        workspace += t * (2 * q_width + 2 * kv_width) * b         # all-to-all send/receive of q, k, v, out
    parts["attention"] = workspace
    chunk = min(s.loss_chunk_tokens, t)
    parts["loss"] = chunk * shape.vocab * (2 * b + 8) + 2 * t * h * b

    if s.offload_optimizer or s.zero_stage == 0 or not bf16:
        step = 0.0                        # no fp32 gradient copy on the GPU (CPU Adam, or kept in "gradients")
    elif s.zero_stage == 3:
        step = min(SUB_GROUP_ELEMENTS, P / N) * 4
    else:
        step = P * 4 / N
    parts["optimizer step"] = step

    held = sum(parts[k] for k in ("weights", "gradients", "optimizer", "buckets"))
    peak = held + max(parts["activations"] + parts["attention"] + parts["loss"], step)
    parts["overhead"] = FIXED_OVERHEAD_GIB * GIB + FRAGMENTATION * peak
    return Estimate({k: v / GIB for k, v in parts.items()}, host / GIB, (peak + parts["overhead"]) / GIB)
