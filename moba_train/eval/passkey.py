"""Passkey retrieval: a random number hidden in a haystack of real text, read back by greedy decoding.

The haystack is built locally from real text, cut at unit boundaries to exactly the asked number of
tokens (Mohtashami & Jaggi, 2023, with real text instead of repeated filler). Two styles:

- `lee` (English, the default): gensim's Lee news articles, cut at sentences:
      <instruction> <filler ...> The pass key is 48213. Remember it. 48213 is the pass key. <filler ...>
      What is the pass key? The pass key is
- `python` (for models trained on code): lines of the Python standard library:
      # <instruction> <code lines ...> PASS_KEY = 48213  # remember this value <code lines ...>
      assert PASS_KEY ==

The key sits at the unit boundary nearest to `depth` (0 = start of the filler, 1 = end). The model
generates greedily (`model.generate` over moba-train's in-place `MobaKVCache`, so MoBA layers decode over
their KV cache as they do at inference); a trial is correct when the first number it writes is the key.
Keys come from Python's `random` seeded by (seed, length, depth, sample), so the training RNG streams are
never touched.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field

import torch

from moba_train.config.run import PasskeyConfig
from moba_train.data.haystacks import STYLES
from moba_train.models.hf_compat import model_cache_keyword
from moba_train.models.kv_cache import MobaKVCache

log = logging.getLogger(__name__)

KEY_DIGITS = 5

@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    answer: str            # the generated text
    correct: bool


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    accuracy_grid: list[list[float | None]]    # [depth index][length index]
    accuracy: float | None                     # over every trial
    trials: list[PasskeyTrial] = field(default_factory=list)
    skipped_lengths: list[int] = field(default_factory=list)
    haystack: str = "lee"                      # the filler style (moba_train.data.haystacks.STYLES)


class Haystacks:
    """Token-exact haystacks for one tokenizer."""

    def __init__(self, tokenizer, style: str = "lee"):
        if style not in STYLES:
            raise ValueError(f"unknown passkey haystack {style!r}; choose one of {sorted(STYLES)}")
        self.tokenizer = tokenizer
        self.name = style
        self.style = STYLES[style]
        encoded = tokenizer(self.style.units(), add_special_tokens=False)["input_ids"]
        self.sentences = [ids for ids in encoded if ids]
        self.filler_tokens = sum(len(s) for s in self.sentences)
        self.prefix = tokenizer(self.style.instruction, add_special_tokens=True)["input_ids"]
        self.question = tokenizer(self.style.question, add_special_tokens=False)["input_ids"]

    def build(self, length: int, depth: float, key: str, start_sentence: int = 0) -> list[int]:
        """Exactly `length` prompt tokens ending with the question."""
        needle = self.tokenizer(self.style.needle.format(key=key), add_special_tokens=False)["input_ids"]
        budget = length - len(self.prefix) - len(needle) - len(self.question)
        if budget < 1:
            raise ValueError(f"a passkey haystack of {length} tokens leaves no room for filler; use lengths >= "
                             f"{len(self.prefix) + len(needle) + len(self.question) + 16}")
        pieces, total, i = [], 0, start_sentence
        while total < budget:                     # the corpus repeats for haystacks longer than it
            ids = self.sentences[i % len(self.sentences)]
            pieces.append(ids[: budget - total])
            total += len(pieces[-1])
            i += 1
        # the sentence boundary nearest to depth * budget
        bounds = [0]
        for p in pieces:
            bounds.append(bounds[-1] + len(p))
        cut = min(range(len(bounds)), key=lambda b: abs(bounds[b] - depth * budget))
        filler_before = [t for p in pieces[:cut] for t in p]
        filler_after = [t for p in pieces[cut:] for t in p]
        ids = self.prefix + filler_before + needle + filler_after + self.question
        assert len(ids) == length, (len(ids), length)
        return ids


def trial_key(seed: int, length: int, depth: float, sample: int) -> str:
    rng = random.Random(f"{seed}/{length}/{depth}/{sample}")
    return str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@torch.no_grad()
def run_passkey(model, tokenizer, lengths: list[int], depths: list[float], *, samples: int = PasskeyConfig.samples,
                seed: int = PasskeyConfig.seed, synced_gpus: bool = False,
                haystacks: Haystacks | str = PasskeyConfig.haystack,
                batch_tokens: int = PasskeyConfig.batch_tokens) -> PasskeyResult:
    """Every (length, depth, sample) trial, one haystack at a time. The trials of one length, every depth and
    sample (the same number of tokens, so no padding), are generated together, up to `batch_tokens` prompt
    tokens at once.
    With ZeRO-3 every rank must call this with the same arguments (and synced_gpus=True): the gathers of
    the partitioned weights are collectives."""
    from transformers import GenerationConfig

    haystacks = Haystacks(tokenizer, haystacks) if isinstance(haystacks, str) else haystacks
    device = next(model.parameters()).device
    key_tokens = len(tokenizer(" " + "9" * KEY_DIGITS, add_special_tokens=False)["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = GenerationConfig(max_new_tokens=key_tokens + 2, do_sample=False, num_beams=1, pad_token_id=pad,
                           eos_token_id=tokenizer.eos_token_id, use_cache=True)
    cache_keyword = model_cache_keyword(model)     # generate() takes moba-train's in-place KV cache by this name
    was_training = model.training
    model.eval()
    trials = []
    try:
        for length in lengths:
            batch = max(1, batch_tokens // length)
            cells = [(depth, sample) for depth in depths for sample in range(samples)]
            for first in range(0, len(cells), batch):
                group = cells[first:first + batch]
                keys = [trial_key(seed, length, depth, sample) for depth, sample in group]
                starts = [(sample * 7919 + length) % len(haystacks.sentences) for _, sample in group]
                ids = torch.tensor([haystacks.build(length, depth, key, start)
                                    for (depth, _), key, start in zip(group, keys, starts)], device=device)
                cache = MobaKVCache.for_model(model, length + gen.max_new_tokens)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                     synced_gpus=synced_gpus, **{cache_keyword: cache})
                for row, (depth, _), key in zip(out, group, keys):
                    answer = tokenizer.decode(row[length:], skip_special_tokens=True)
                    trials.append(PasskeyTrial(length, depth, key, answer, first_number(answer) == key))
    finally:
        model.train(was_training)
    grid = [[_mean([t.correct for t in trials if t.length == n and t.depth == d]) for n in lengths] for d in depths]
    return PasskeyResult(list(lengths), list(depths), grid, _mean([t.correct for t in trials]), trials,
                         haystack=haystacks.name)


def _mean(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def passkey_lengths(configured: list[int] | None, stage_len: int | None, cap: int) -> tuple[list[int], list[int]]:
    """(lengths to run, lengths skipped by the cap). Stage ends test up to the stage's length."""
    wanted = sorted(set(configured)) if configured else ([stage_len] if stage_len else [])
    if stage_len is not None:
        wanted = [n for n in wanted if n <= stage_len]
    return [n for n in wanted if n <= cap], [n for n in wanted if n > cap]


def describe(result: PasskeyResult) -> str:
    head = f"passkey accuracy, {result.haystack} haystack (depth x length): " + ", ".join(
        f"{n}: " + "/".join("-" if a is None else f"{a:.0%}" for a in col) for n, col in
        zip(result.lengths, zip(*result.accuracy_grid)))
    if result.skipped_lengths:
        head += f"; skipped lengths {result.skipped_lengths} (over eval.passkey.max_length[_cpu])"
    return head
