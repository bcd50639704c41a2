"""Cross-entropy from the last hidden state, a few positions at a time.

A 1M-token sequence with a 128K vocabulary would need 512 GB for its fp32 logits. Each chunk's
logits are recomputed in backward (activation checkpointing), so only one chunk is alive at once.
The head is called as a module (not through its weight) so that ZeRO-3 gathers its parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), labels, ignore_index=-100, reduction="sum")


def chunked_lm_loss_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, shift_labels: torch.Tensor,
                        chunk_tokens: int) -> torch.Tensor:
    """Sum of token cross-entropies over positions whose label is not -100. hidden [..., H], labels [...]."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = shift_labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk_tokens):
        # Every chunk runs, even one without targets, so all ranks issue the same ZeRO-3 gathers.
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h, lm_head, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, lm_head, y)
    return total
