"""The attention function moba-train registers with transformers, and `attach_plan`.

Registered under ATTN_IMPLEMENTATION ("moba_train") with `transformers.AttentionInterface`; no
transformers class is patched. Each call asks its module's context (`models.context`) for the plan,
`plan.at(module.layer_idx)`, and runs
full or MoBA attention on varlen tensors:

* document boundaries come from the `cu_seq_lens_q`/`max_length_q` kwargs (what the trainer passes),
  else from `position_ids` (a document starts at each row and wherever positions do not go on by +1);
* rows of a batch are flattened (a document never spans two rows); left/right padding given by a
  2-D attention mask is dropped before attention and its outputs are 0;
* with a KV cache (fewer queries than keys, i.e. `generate()`), `attend_cached` runs instead; MoBA
  layers that decode sparsely take the cache's block means from `decode_cache`, whose forward
  pre-hook `attach_plan` adds to each attention module.

`attend_varlen` is the core on [T, H, D] tensors, kept separate so that sequence parallelism can wrap it.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import flash_attention_mask

from ..ops import moba_attn_varlen
from ..ops.full_attn import full_attn_varlen
from .cached_attention import attend_cached, cached_kind
from .context import AttentionContext, attention_context, has_context
from .decode_cache import cache_block_means, device_decoding, track_kv_caches
from .hf_compat import cache_argument
from .mask_facts import once_per_mask
from .plan import AttentionPlan, LayerAttention

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "moba_train"

# Model-specific attention features the operators do not implement: refuse rather than ignore them.
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


def _full(q, k, v, cu_seqlens, max_seqlen, layer: LayerAttention, softmax_scale):
    return full_attn_varlen(q, k, v, cu_seqlens, max_seqlen, softmax_scale=softmax_scale, backend=layer.backend)


def _moba(q, k, v, cu_seqlens, max_seqlen, layer: LayerAttention, softmax_scale):
    return moba_attn_varlen(q, k, v, cu_seqlens, max_seqlen, block_size=layer.block_size, topk=layer.topk,
                            softmax_scale=softmax_scale, backend=layer.backend, centroids=layer.centroids)


VARLEN_OPS: dict[str, Callable] = {"full": _full, "moba": _moba}


def attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                  layer_attention: LayerAttention, *, softmax_scale: float | None = None) -> torch.Tensor:
    """Causal attention within packed documents in the layer's mode. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    return VARLEN_OPS[layer_attention.mode](q, k, v, cu_seqlens, max_seqlen, layer_attention, softmax_scale)


def _layer_attention(module) -> LayerAttention:
    return attention_context(module).plan.at(module.layer_idx)


def _padding_mask(attention_mask, batch: int, kv_len: int) -> torch.Tensor | None:
    """The [B, K] bool key mask (True = real token) or None. Our mask builder only ever yields 2-D masks."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} takes a 2-D padding mask [batch, keys], got a "
                         f"{attention_mask.dim()}-D mask; pass the tokenizer's attention_mask, not a prepared one")
    if tuple(attention_mask.shape) != (batch, kv_len):
        raise ValueError(f"padding mask {tuple(attention_mask.shape)} does not cover the {kv_len} keys of a batch of "
                         f"{batch}; static KV caches are not supported, use the default DynamicCache")
    return attention_mask.bool()


def _boundaries(batch: int, seq: int, keep: torch.Tensor | None, kwargs: dict,
                device: torch.device) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and max_seqlen over the flattened, unpadded tokens."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        if keep is not None:
            raise ValueError("got both cu_seq_lens_q and a padding attention_mask: packed batches carry no padding, "
                             "drop attention_mask")
        cu_k, max_q = kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_q")
        if max_q is None:
            raise ValueError("cu_seq_lens_q was passed without max_length_q; pass both (and cu_seq_lens_k/max_length_k)")
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
            raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q: self-attention over packed documents needs the "
                             "same boundaries for queries and keys")
        return cu_q.to(torch.int32), int(max_q)

    position_ids = kwargs.get("position_ids")
    if position_ids is None and keep is None:
        # Every row is one whole document: nothing to read back from the device.
        return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device), seq
    if position_ids is None:
        pos = torch.arange(seq, device=device).repeat(batch)
    else:
        pos = position_ids.to(device).expand(batch, seq).reshape(-1)
    row = torch.arange(batch, device=device).repeat_interleave(seq)
    if keep is not None:
        pos, row = pos[keep], row[keep]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = (row[1:] != row[:-1]) | (pos[1:] != pos[:-1] + 1)
    first = starts.nonzero().squeeze(1)
    cu = torch.cat([first, first.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _unpadded_documents(padding: torch.Tensor | None, batch: int, seq: int, kwargs: dict,
                        device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """The flat indices of the real tokens (None: all are), cu_seqlens and max_seqlen over them. They are read
    back from the device; every layer of a forward gets the same mask and position ids, so once per forward."""
    def compute():
        keep = padding.reshape(-1).nonzero().squeeze(1) if padding is not None and not bool(padding.all()) else None
        return (keep, *_boundaries(batch, seq, keep, kwargs, device))

    position_ids = kwargs.get("position_ids")
    if kwargs.get("cu_seq_lens_q") is not None or (padding is None and position_ids is None):
        return compute()                  # the trainer's packs (boundaries given), or whole rows: no device read
    owner, also = (padding, position_ids) if padding is not None else (position_ids, None)
    return once_per_mask(owner, ("unpadded documents", batch, seq, str(device)), compute, also)


def moba_train_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, S, D], key/value [B, Hkv, K, D] -> ([B, S, Hq, D], None)."""
    layer = _layer_attention(module)
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported by moba-train's attention; set "
                         f"config.attention_dropout = 0.0")
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{type(module).__name__} uses {name!r}, which moba-train's attention does not implement; "
                             f"this model family is not supported (see docs/models.md)")
    B, Hq, S, D = query.shape
    K = key.shape[2]
    padding = _padding_mask(attention_mask, B, K)
    window = kwargs.get("sliding_window")

    if S != K:  # decoding over a KV cache
        if kwargs.get("cu_seq_lens_q") is not None:
            raise ValueError("packed documents (cu_seq_lens_q) cannot be combined with a KV cache; pass use_cache=False")
        if window is not None and K > window:
            raise ValueError(f"the cache holds {K} tokens, more than sliding_window={window}, which moba-train does not "
                             f"implement; set config.sliding_window = None")
        decoding = device_decoding(module, layer)
        if decoding is not None:            # lengths on the device (graph_decode): the step is capturable
            return decoding.attend(query, scaling), None
        block_means = (cache_block_means(module, K - S, layer.block_size, layer.centroids)
                       if cached_kind(layer) == "moba" else None)
        return attend_cached(query, key, value, padding, layer, scaling, block_means), None

    sequence_parallel = attention_context(module).sequence_parallel
    if sequence_parallel is not None:
        # Ulysses (moba_train.distributed): this rank holds S of each row's positions; the pack's global
        # boundaries come from the trainer, since local position_ids cannot tell them.
        if kwargs.get("cu_seq_lens_q") is None or padding is not None:
            raise ValueError("sequence parallelism needs packed batches with cu_seq_lens_q/max_length_q and no "
                             "padding mask (what the trainer passes)")
        cu, max_len = _boundaries(B, S, None, kwargs, query.device)
        if window is not None and max_len > window:
            raise ValueError(f"a document of {max_len} tokens exceeds sliding_window={window}, which moba-train does "
                             f"not implement; set config.sliding_window = None")
        out = sequence_parallel(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cu, max_len,
                                layer, scaling)
        return out, None

    keep, cu, max_len = _unpadded_documents(padding, B, S, kwargs, query.device)
    if window is not None and max_len > window:
        raise ValueError(f"a document of {max_len} tokens exceeds sliding_window={window}, which moba-train does not "
                         f"implement; set config.sliding_window = None")
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    k = key.transpose(1, 2).reshape(B * S, -1, D)
    v = value.transpose(1, 2).reshape(B * S, -1, D)
    if keep is not None:
        q, k, v = q[keep], k[keep], v[keep]
    out = attend_varlen(q, k, v, cu, max_len, layer, softmax_scale=scaling)
    if keep is not None:
        out = out.new_zeros(B * S, Hq, D).index_copy(0, keep, out)
    return out.view(B, S, Hq, D), None


AttentionInterface.register(ATTN_IMPLEMENTATION, moba_train_attention)
# Without a registered mask builder transformers hands custom functions no mask at all, so padding
# would be silently ignored. flash-attn's builder yields just the 2-D padding mask (or None): O(B x L),
# never a dense T x T mask.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
             and hasattr(m, "num_key_value_groups")]
    found.sort(key=lambda m: m.layer_idx)
    indices = [m.layer_idx for m in found]
    if not found or indices != list(range(len(found))):
        raise ValueError(f"{type(model).__name__}: expected one attention module (with layer_idx and "
                         f"num_key_value_groups) per layer 0..L-1, found layers {indices}; this model family is not "
                         f"supported (see docs/models.md)")
    return found


def attach_plan(model: torch.nn.Module, plan: AttentionPlan) -> torch.nn.Module:
    """Make `model` ask `plan` for each layer's attention and select moba-train's attention implementation.

    The model gets its own copy of its config first: models built from one config object share it,
    and switching the implementation would otherwise switch every such model.
    """
    modules = attention_modules(model)
    if len(modules) != plan.num_layers:
        raise ValueError(f"the plan covers {plan.num_layers} layers but {type(model).__name__} has {len(modules)}; "
                         f"build it with AttentionPlan.from_config(cfg, num_layers={len(modules)})")
    for m in modules:
        cache_argument(m)      # before anything changes: refuses a transformers whose cache argument is unknown
    old = model.config
    own = copy.deepcopy(old)
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = own
    for m in modules:
        if has_context(m):
            attention_context(m).plan = plan
        else:
            m.moba_train = AttentionContext(plan=plan, kv_caches=track_kv_caches(m))
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    log.info("attention plan attached to %s: %s", type(model).__name__, plan.describe())
    return model




def backend_choices(plan: AttentionPlan, device: torch.device, dtype: torch.dtype,
                    head_dim: int | None = None) -> dict[str, str]:
    """Which backend each layer kind of `plan` runs on `device` in `dtype` (what `auto` resolves to), over all
    of the plan's phases: {"moba": "triton", "full": "varlen (sdpa per document when ...)"}."""
    from ..ops.full_attn import FULL_ATTN_BACKENDS, LONG_DOCUMENT
    from ..ops.moba import BACKENDS as MOBA_BACKENDS

    kinds = {plan.at(i, start).mode for start in plan.phase_starts() for i in range(plan.num_layers)}
    out = {}
    if "moba" in kinds:
        out["moba"] = MOBA_BACKENDS.resolve(plan.config.backend, device, dtype, head_dim).name
    if "full" in kinds:
        name = FULL_ATTN_BACKENDS.resolve(plan.config.full_backend, device, dtype, head_dim).name
        if plan.config.full_backend == "auto" and name == "varlen":
            name += f" (sdpa per document when documents average >= {LONG_DOCUMENT} tokens)"
        out["full"] = name
    return out


__all__ = ["ATTN_IMPLEMENTATION", "attend_varlen", "attach_plan", "attention_modules", "backend_choices",
           "moba_train_attention", "VARLEN_OPS"]
