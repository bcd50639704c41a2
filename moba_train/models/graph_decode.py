"""Decoding with one CUDA graph replay per token, greedy or sampled, for models running moba-train's attention.

`generate()` runs every step eagerly: for a small model at batch 1 the host (transformers' Python, the
launches of some 20 kernels per layer) is the step, not the GPU (docs/benchmarks.md, Decoding: the SmolLM2
shape spends ~27 ms a token on the host against well under 1 ms of attention). Here the prompt is prefilled
into a `MobaKVCache`; its layers are then taken over by `DeviceDecodeLayer`s (lengths and block means on the
device, `models.device_decode`), so one model step, the token's choice and the cache's growth included, is
the same work at every length: captured once as a CUDA graph and replayed once per new token.

    ids = greedy_decode(model, input_ids, max_new_tokens=256)            # [B, prompt + 256]
    ids = sample_decode(model, input_ids, 256, Sampling(temperature=0.7, top_p=0.9))

Sampling draws as generate(do_sample=True) does (`models.sampling`), from torch's default generator of the device
(seed it with torch.manual_seed). With `eos_token_id`, rows that produced it get `pad_token_id` from then on and
decoding stops once every row has, as generate() does; whether they all have is read back every EOS_CHECK_EVERY
tokens (one host synchronisation each), so up to that many steps more may run (their tokens are cut). A fixed
batch; left padding through `attention_mask`. Sparse MoBA layers run the fused kernel (`decode_backend` auto or
triton); layers that decode densely attend over the whole buffer, masked to the filled slots. On a CPU (or
with `cuda_graph=False`) the same steps run eagerly: what the tests compare with `generate()`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .attention import attention_modules
from .cached_attention import cached_kind, decode_backend
from .context import attention_context
from .device_decode import DeviceDecodeLayer, DeviceKVLayer
from .hf_compat import model_cache_keyword, output_cache
from .kv_cache import MobaKVCache, MobaKVLayer
from .sampling import Sampling, draw, filtered_scores

# Tokens between two checks whether every row has produced an EOS id (each check reads a flag back to the host).
EOS_CHECK_EVERY = 16


def device_kv_cache(model: torch.nn.Module, cache: MobaKVCache, attention_mask: torch.Tensor | None = None) -> Cache:
    """A cache whose layers continue `cache` (prefilled by `model`; its buffers are used in place) with their
    lengths and block means on the device. `attention_mask` [B, prompt]: the prefill's (left padding)."""
    modules = attention_modules(model)
    if not isinstance(cache, MobaKVCache) or len(cache.layers) != len(modules):
        raise ValueError(f"device decoding continues a MobaKVCache of the model's {len(modules)} layers, got "
                         f"{type(cache).__name__}")
    key_valid = attention_mask.bool() if attention_mask is not None else None
    layers = []
    for module, prefilled in zip(modules, cache.layers):
        if not isinstance(prefilled, MobaKVLayer) or not prefilled.is_initialized:
            raise ValueError(f"layer {module.layer_idx} of the cache holds no prefill: run the prompt through the "
                             f"model with this cache first")
        plan = attention_context(module).plan.at(module.layer_idx)
        sparse = cached_kind(plan) == "moba"
        if sparse and decode_backend(plan, prefilled.device) != "triton":
            raise ValueError(f"layer {module.layer_idx} decodes sparsely with decode_backend={plan.decode_backend}, "
                             f"which resolves to the PyTorch ops here: device decoding runs the fused kernel (a "
                             f"CUDA GPU with triton, decode_backend auto or triton); use generate() otherwise")
        decoding = DeviceDecodeLayer(prefilled._keys, prefilled._values, prefilled.length,
                                     plan.block_size if sparse else None, plan.topk, plan.centroids, key_valid)
        layers.append(DeviceKVLayer(prefilled, decoding, plan))
    return Cache(layers=layers)


class DecodingSteps:
    """Decoding steps after a prefill into a `MobaKVCache`, every changing quantity on the device: the token just
    chosen, its position, the tokens so far and the cache (`device_kv_cache`). `step` runs one; `capture` records
    one as a CUDA graph, which `replay` runs as often as the cache has room. Tokens are chosen greedily, or drawn
    as `sampling` says; a row that has produced one of `eos_token_id` gets `pad_token_id` from then on
    (`finished`)."""

    def __init__(self, model: torch.nn.Module, cache: MobaKVCache, last_logits: torch.Tensor,
                 last_positions: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 sampling: Sampling | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None):
        """last_logits [B, V] and last_positions [B, 1] of the prompt's last token; the first new token is chosen
        from them. The cache needs room for max_new_tokens - 1 more tokens. `pad_token_id` defaults to the first
        EOS id (as generate() does)."""
        self.model, self.keyword = model, model_cache_keyword(model)
        self.cache = device_kv_cache(model, cache, attention_mask)
        self.sampling = sampling
        B, device = last_logits.shape[0], last_logits.device
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
        if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)
                                         or pad_token_id < 0):
            raise ValueError(f"pad_token_id must be a token id, got {pad_token_id!r}")
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.token = self._next_token(last_logits)                                      # [B, 1]
        self.position = last_positions + 1
        self.tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=last_logits.device)
        self.tokens[:, :1] = self.token
        self.written = torch.ones(1, dtype=torch.long, device=last_logits.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row [B, 1] from logits [B, V]."""
        if self.sampling is None:
            return logits.argmax(-1, keepdim=True)
        return draw(filtered_scores(logits, self.sampling))

    def _next_token(self, logits: torch.Tensor) -> torch.Tensor:
        token = self.choose(logits)
        if self.eos is not None:
            token = token.masked_fill(self.finished[:, None], self.pad)
            self.finished |= (token == self.eos).any(-1)
        return token

    def step(self) -> None:
        logits = self.model(input_ids=self.token, position_ids=self.position, use_cache=True,
                            **{self.keyword: self.cache}).logits
        self.token.copy_(self._next_token(logits[:, -1]))
        self.tokens.index_copy_(1, self.written, self.token)
        self.written.add_(1)
        self.position.add_(1)

    def capture(self) -> None:
        """Run one step eagerly on a side stream (it compiles the kernels: torch.cuda.graphs' warm-up), then
        record the next one, which `replay` runs."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()                                   # recorded, not run

    def replay(self) -> None:
        self.graph.replay()

    def new_tokens(self, chosen: int) -> torch.Tensor:
        """The first `chosen` new tokens [B, n], cut after the token with which the last row finished, if every
        row has (generate()'s length)."""
        tokens = self.tokens[:, :chosen]
        if self.eos is None:
            return tokens
        is_eos = (tokens[..., None] == self.eos).any(-1)                                # [B, n]
        if not bool(is_eos.any(-1).all()):
            return tokens
        return tokens[:, :int(is_eos.int().argmax(-1).max()) + 1]


def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                  attention_mask: torch.Tensor | None = None, cuda_graph: bool | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """input_ids [B, P] (left-padded where attention_mask [B, P] says so) -> [B, P + new], greedy: new is
    max_new_tokens, or fewer when every row produced one of `eos_token_id` (rows that did get `pad_token_id`
    after it, by default the first EOS id), as generate() returns.

    `cuda_graph` (default: on a CUDA device): the second step is captured and replayed for the rest."""
    return _decode(model, input_ids, max_new_tokens, attention_mask, cuda_graph, None, eos_token_id, pad_token_id)


def sample_decode(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling,
                  attention_mask: torch.Tensor | None = None, cuda_graph: bool | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """As greedy_decode, each new token drawn as `sampling` says (generate(do_sample=True)'s temperature, top_k,
    top_p), from the default generator of the model's device: with the same seed and `cuda_graph=False` it draws
    the tokens generate() draws."""
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a moba_train.models.Sampling, got {type(sampling).__name__}")
    return _decode(model, input_ids, max_new_tokens, attention_mask, cuda_graph, sampling, eos_token_id, pad_token_id)


@torch.no_grad()
def _decode(model, input_ids, max_new_tokens, attention_mask, cuda_graph, sampling, eos_token_id,
            pad_token_id) -> torch.Tensor:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = input_ids.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, the inputs are on {device}")
    B, P = input_ids.shape
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)      # each row's positions from its first token
    else:
        positions = torch.arange(P, device=device).expand(B, P)
    prefill = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{model_cache_keyword(model): MobaKVCache.for_model(model, P + max_new_tokens)})
    decoding = DecodingSteps(model, output_cache(prefill), prefill.logits[:, -1], positions[:, -1:], max_new_tokens,
                             attention_mask, sampling, eos_token_id, pad_token_id)
    steps, done = max_new_tokens - 1, 0
    advance = decoding.step
    if cuda_graph and steps >= 2:
        decoding.capture()                                # runs the first step, records the second
        done, advance = 1, decoding.replay
    while done < steps:
        if decoding.eos is not None and done % EOS_CHECK_EVERY == 0 and bool(decoding.finished.all()):
            break
        advance()
        done += 1
    return torch.cat([input_ids, decoding.new_tokens(done + 1)], dim=1)


__all__ = ["DecodingSteps", "EOS_CHECK_EVERY", "device_kv_cache", "greedy_decode", "sample_decode"]
