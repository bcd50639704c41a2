"""Drawing the next token as `generate(do_sample=True)` does, with no value read back to the host.

transformers' order: the logits in fp32, divided by the temperature, then top-k, then top-p (nucleus) filtering,
then one draw from the softmax. The draw divides the probabilities by exponential noise and takes the argmax, which
is what `torch.multinomial` does for one sample (so with the same generator state it picks the same token), minus
multinomial's validity checks, which some torch versions read back to the host (no CUDA graph can hold that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """`temperature` > 0; `top_k` (None: off) keeps the k most likely tokens; `top_p` (None: off) keeps the fewest
    most likely tokens whose probabilities sum to at least top_p. The meanings of generate()'s arguments."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"Sampling(temperature={self.temperature!r}): needs a finite number > 0 (greedy "
                             f"decoding is greedy_decode)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"Sampling(top_k={self.top_k!r}): needs an int >= 1, or None for no top-k filter")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"Sampling(top_p={self.top_p!r}): needs a number in (0, 1], or None for no top-p filter")


def filtered_scores(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [B, V] -> fp32 scores [B, V], -inf where a filter removed the token (at least one token stays)."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        k = min(sampling.top_k, scores.shape[-1])
        kth = scores.topk(k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None:
        ascending, order = scores.sort(dim=-1)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        remove[..., -1:] = False                                     # the most likely token always stays
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def draw(scores: torch.Tensor) -> torch.Tensor:
    """One token per row [B, 1] from softmax(scores [B, V]), drawn as torch.multinomial(probs, 1) draws it."""
    probs = scores.softmax(-1)
    noise = torch.empty_like(probs).exponential_()
    return (probs / noise).argmax(-1, keepdim=True)


__all__ = ["Sampling", "draw", "filtered_scores"]
