"""Per-GPU memory of one training stage, estimated from the model's shape (no weights, no GPU).

An estimate to catch a stage that cannot fit before a cluster job starts, not an exact account
(expect +-20%). Bytes per parameter P (b = 2 in bf16, 4 in fp32; N = all ranks, ZeRO shards over
every rank whatever the sequence parallelism):

  weights      P*b, divided by N under ZeRO-3; 0 with offload_params. ZeRO-3 also holds the
               gathered weights it is working on: 2 decoder layers or the largest single module
               (embedding / LM head), whichever is larger.
  gradients    bf16: the model-dtype gradients (P*b, /N under ZeRO-2/3) plus DeepSpeed's fp32 gradient
               partition (P*4, /N from ZeRO-1); fp32: P*4 (/N under ZeRO-2/3).
  optimizer    Adam moments (8 bytes) plus the fp32 master copy in bf16 (4 bytes); /N from ZeRO-1;
               0 on the GPU with offload_optimizer (reported as host memory instead).
  buckets      DeepSpeed's gradient reduce bucket (reduce_bucket_size 5e8 elements) under ZeRO-1/2/3.
  activations  t = micro_batch * seq_len / sp tokens per GPU. With activation checkpointing each layer
               keeps its input (t*h*b; in host memory with offload_activations) and one layer is
               recomputed at a time: its forward tensors and their gradients, the MLP intermediate
               divided by tiled_mlp_chunks. Without checkpointing every layer keeps its forward tensors.
  attention    per GPU the whole sequence for Hq/sp heads: log-sum-exp (fp32), MoBA's chosen block
               ids (int64, topk-1 per query and head) and its gate's score chunk; Ulysses all-to-all
               buffers (q, k, v, out) when sp > 1.
  loss         one chunk of loss_chunk_tokens logits: model dtype, fp32 copy, log-softmax and its
               gradient; plus the last hidden state and its gradient.
  overhead     CUDA context, NCCL buffers, allocator fragmentation: 2.5 GiB + 5% of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
REDUCE_BUCKET_ELEMENTS = 5e8          # DeepSpeed's default reduce_bucket_size
FIXED_OVERHEAD_GIB = 2.5
FRAGMENTATION = 0.05
ROUTING_CHUNK_BYTES = (1 << 23) * 4   # MoBA gate scores for a chunk of queries (moba_train.ops.moba.routing)


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


@dataclass
class Estimate:
    parts: dict[str, float]      # GiB on each GPU
    host_gib_per_rank: float     # host memory each rank needs for what is offloaded

    @property
    def total(self) -> float:
        return sum(self.parts.values())


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

    grad_shard = N if s.zero_stage >= 2 else 1
    grads = P * b / grad_shard
    if bf16:
        grads += P * 4 / (N if s.zero_stage >= 1 else 1)
    parts["gradients"] = grads

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
    attn_tensors = 4 * h + 3 * q_width + 3 * kv_width           # norm, q/k/v (+ RoPE copies), attn out, o_proj
    mlp_chunk = 4 * inter / max(1, s.tiled_mlp_chunks)           # gate, up, act, act*up
    layer_forward = t * (attn_tensors + 2 * h + mlp_chunk) * b
    if s.checkpointing:
        kept = shape.layers * t * h * b
        if s.offload_activations:
            host += kept
            kept = 0.0
        activations = kept + 2 * layer_forward                    # one layer recomputed: tensors + gradients
    else:
        activations = shape.layers * layer_forward + layer_forward
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

    subtotal = sum(parts.values())
    parts["overhead"] = FIXED_OVERHEAD_GIB * GIB + FRAGMENTATION * subtotal
    return Estimate({k: v / GIB for k, v in parts.items()}, host / GIB)
