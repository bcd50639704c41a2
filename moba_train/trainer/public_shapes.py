"""Architectures of public models, for the dry run when a recipe's weights are not on this machine.

Only config.json fields that decide memory and parallel layout (the released models' values);
`moba-train recipe=NAME dry_run=true dry_run_model=llama3_8b` picks one explicitly, and a recipe whose
model.path is missing falls back to the entry its model.name names (the dry run says so).
"""

from __future__ import annotations

PUBLIC_SHAPES: dict[str, dict] = {
    "llama3_8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072, tie_word_embeddings=False),
    "llama3_70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       max_position_embeddings=131072, tie_word_embeddings=False),
    "qwen2_5_7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen2_5_14b": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen3_8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, tie_word_embeddings=False),
    "mistral_7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False),
    "smollm2_135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}

# model.name values of the shipped model configs -> table entry
NAME_ALIASES: dict[str, str] = {
    "llama-3.1-8b": "llama3_8b",
    "llama-3-8b": "llama3_8b",
    "llama-3.1-70b": "llama3_70b",
    "qwen2.5-7b": "qwen2_5_7b",
    "qwen2.5-14b": "qwen2_5_14b",
    "qwen3-8b": "qwen3_8b",
    "mistral-7b": "mistral_7b",
    "smollm2-135m-instruct": "smollm2_135m",
}


def lookup(name: str) -> str | None:
    """Table key for a table key or a model.name alias."""
    key = name.lower()
    return key if key in PUBLIC_SHAPES else NAME_ALIASES.get(key)
