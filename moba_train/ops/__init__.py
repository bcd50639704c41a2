from .moba import moba_attn_varlen

__all__ = ["moba_attn_varlen"]
