"""Models with a per-layer, scheduled full/MoBA attention plan; loading, RoPE per stage, export to HF.

Importing this package registers moba-train's attention function with transformers under
ATTN_IMPLEMENTATION ("moba_train"); `attach_plan` selects it for a model.
"""

from .attention import ATTN_IMPLEMENTATION, attach_plan, attend_varlen, attention_modules
from .export import EXPORT_KEY, export_model
from .graph_decode import greedy_decode, sample_decode
from .loading import (DEFAULT_MODEL, LoadedModel, build_from_config, cache_root, load, load_embedded, load_gguf,
                      load_hf_dir, load_model)
from .plan import AttentionPlan, AttentionPlanConfig, LayerAttention, PhaseConfig
from .kv_cache import MobaKVCache
from .rope import set_rope
from .sampling import Sampling

__all__ = ["ATTN_IMPLEMENTATION", "AttentionPlan", "AttentionPlanConfig", "DEFAULT_MODEL", "EXPORT_KEY",
           "LayerAttention", "LoadedModel", "MobaKVCache", "PhaseConfig", "Sampling", "attach_plan", "attend_varlen",
           "attention_modules", "build_from_config", "cache_root", "export_model", "greedy_decode", "load",
           "load_embedded", "load_gguf", "load_hf_dir", "load_model", "sample_decode", "set_rope"]
