"""An independent MoBA written from the paper (arXiv 2502.13189, Sec. 2.2-2.3), one query at a time.

Deliberately shares nothing with moba_train: it scores blocks on its own, loops over documents,
heads and queries in Python, and is only fit for tiny inputs.
"""

import math

import torch


def moba_reference(q, k, v, cu_seqlens, block_size, topk, scale=None):
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        n = end - start
        n_blocks = math.ceil(n / block_size)
        for h in range(Hq):
            qs = q[start:end, h].double()
            ks = k[start:end, h // group].double()
            vs = v[start:end, h // group].double()
            means = [ks[b * block_size:min(n, (b + 1) * block_size)].float().mean(0).double() for b in range(n_blocks)]
            for t in range(n):
                own = t // block_size
                gate = {j: float(qs[t].detach() @ means[j].detach()) for j in range(own)}
                chosen = sorted(gate, key=gate.get, reverse=True)[:topk - 1] + [own]
                keys = [u for j in chosen for u in range(j * block_size, min(n, (j + 1) * block_size)) if u <= t]
                keys.sort()
                logits = (ks[keys] @ qs[t]) * scale
                out[start + t, h] = torch.softmax(logits, 0) @ vs[keys]
    return out
