"""Run a decoder layer's MLP over the sequence a chunk at a time (ALST's TiledMLP idea).

At 1M tokens an 8B model's MLP intermediate ([L, 14336] x 3) alone is tens of GB. Each chunk is
checkpointed, so backward recomputes it and only one chunk's intermediate is alive at once.
The wrapper replaces `layer.mlp` on the model instance; no transformers class is touched.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


class TiledMLP(torch.nn.Module):
    def __init__(self, mlp: torch.nn.Module, chunks: int):
        super().__init__()
        if chunks < 2:
            raise ValueError(f"TiledMLP needs chunks >= 2, got {chunks}")
        self.mlp = mlp
        self.chunks = chunks

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pieces = hidden.chunk(self.chunks, dim=-2)       # [..., seq, hidden]: split the sequence
        if not torch.is_grad_enabled():
            return torch.cat([self.mlp(p) for p in pieces], dim=-2)
        return torch.cat([checkpoint(self.mlp, p, use_reentrant=False) for p in pieces], dim=-2)


def tile_mlps(model: torch.nn.Module, chunks: int) -> int:
    """Wrap the `mlp` of every decoder layer; returns how many were wrapped."""
    layers = model.get_decoder().layers
    for layer in layers:
        if not isinstance(layer.mlp, TiledMLP):
            layer.mlp = TiledMLP(layer.mlp, chunks)
    return len(layers)
