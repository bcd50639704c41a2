"""sp=2 Ulysses attention vs the unsharded operator, outputs and gradients (run by test_ulysses.py)."""

import datetime
import os
import sys

import deepspeed
import torch

from moba_train.distributed.ulysses import UlyssesAttention
from moba_train.distributed.groups import sequence_parallel_group
from moba_train.models.attention import attend_varlen
from moba_train.models.plan import LayerAttention

# CPU (gloo, fp64) in CI; MOBA_TEST_DEVICE=cuda runs the same checks over NCCL in bf16 on GPUs.
ON_GPU = os.environ.get("MOBA_TEST_DEVICE") == "cuda"
if ON_GPU:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
deepspeed.init_distributed(dist_backend="nccl" if ON_GPU else "gloo", timeout=datetime.timedelta(seconds=60),
                           verbose=False)
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
DEVICE = torch.device("cuda") if ON_GPU else torch.device("cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float64
TOLERANCE = 2e-2 if ON_GPU else 1e-10      # bf16: the sharded run differs only in summation order
group = sequence_parallel_group(world)

CASES = {
    # name: (rows B, row length L, doc lengths per row, Hq, Hkv, layer)
    "moba-gqa-doc-across-shard": (1, 96, [[40, 56]], 4, 2, LayerAttention("moba", 16, 2, "auto")),
    "moba-kv-replicated": (1, 64, [[64]], 4, 1, LayerAttention("moba", 8, 3, "auto")),
    "moba-two-rows": (2, 64, [[10, 30, 24], [64]], 8, 2, LayerAttention("moba", 16, 2, "auto")),
    "full-gqa-doc-across-shard": (1, 96, [[40, 56]], 4, 2, LayerAttention("full", 16, 2, "auto")),
}
failures = []
for name, (B, L, docs, Hq, Hkv, layer) in CASES.items():
    g = torch.Generator().manual_seed(0)
    D = 16
    q, k, v = (torch.randn(B, L, h, D, generator=g).to(DEVICE, DTYPE) for h in (Hq, Hkv, Hkv))
    grad_out = torch.randn(B, L, Hq, D, generator=g).to(DEVICE, DTYPE)
    lens = [n for row in docs for n in row]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    # reference: the whole sequence on one rank
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = attend_varlen(qr.reshape(B * L, Hq, D), kr.reshape(B * L, Hkv, D), vr.reshape(B * L, Hkv, D), cu, max(lens),
                        layer, softmax_scale=D ** -0.5).view(B, L, Hq, D)
    ref.backward(grad_out)

    part = L // world
    sl = slice(rank * part, (rank + 1) * part)
    qs, ks, vs = (t[:, sl].clone().requires_grad_() for t in (q, k, v))
    out = UlyssesAttention(group, world, Hq, Hkv)(qs, ks, vs, cu, max(lens), layer, D ** -0.5)
    out.backward(grad_out[:, sl])
    for what, a, b in (("out", out, ref[:, sl]), ("dq", qs.grad, qr.grad[:, sl]), ("dk", ks.grad, kr.grad[:, sl]),
                       ("dv", vs.grad, vr.grad[:, sl])):
        err = (a.float() - b.float()).abs().max().item()
        if err > TOLERANCE * max(1.0, b.float().abs().max().item()):   # bf16: relative to the magnitude
            failures.append(f"rank {rank} {name} {what}: max diff {err:.2e}")
print("\n".join(failures) or f"rank {rank}: all equal ({DEVICE.type}, {DTYPE})", flush=True)
torch.distributed.barrier()
torch.distributed.destroy_process_group()   # exiting with live gloo threads can abort the process
sys.exit(1 if failures else 0)
