"""The module DeepSpeed trains: a causal LM that returns the summed token loss of a packed batch."""

from __future__ import annotations

import torch

from .loss import chunked_lm_loss_sum


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_kwargs(batch: dict) -> dict:
    """A packed micro-batch in the names transformers forwards untouched to the attention function."""
    cu = batch["cu_seqlens"]
    return dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"], use_cache=False)


class PackedCausalLM(torch.nn.Module):
    """Wraps a transformers causal LM; forward(batch) -> sum of cross-entropies over targeted positions.

    Going through one module's forward keeps DeepSpeed's hooks (ZeRO-3 gathers) in charge of every
    parameter, the LM head included.
    """

    def __init__(self, lm: torch.nn.Module, loss_chunk_tokens: int):
        super().__init__()
        self.lm = lm
        self.loss_chunk_tokens = loss_chunk_tokens

    def hidden_states(self, batch: dict) -> torch.Tensor:
        return self.lm.get_decoder()(**model_kwargs(batch)).last_hidden_state

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.hidden_states(batch)
        return chunked_lm_loss_sum(hidden, self.lm.get_output_embeddings(), batch["shift_labels"], self.loss_chunk_tokens)
