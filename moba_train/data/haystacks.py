"""The filler texts of passkey haystacks, by style (moba_train.eval.passkey builds the haystacks).

Kept with the data, below the configuration, so that `eval.passkey.haystack` is checked against the
styles before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
PYTHON_FILLER_LINES = 20000   # ~200K tokens of stdlib code; longer haystacks repeat it


def _lee_units() -> list[str]:
    from .embedded import lee_articles, sentences
    return [" " + s for article in lee_articles() for s in sentences(article)]


def _python_units() -> list[str]:
    from .embedded import stdlib_files

    lines = []
    for path in stdlib_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            lines += [line for line in f if line.strip() and "PASS_KEY" not in line]
        if len(lines) >= PYTHON_FILLER_LINES:
            return lines[:PYTHON_FILLER_LINES]
    return lines


@dataclass(frozen=True)
class HaystackStyle:
    instruction: str                 # tokenized with the tokenizer's special tokens (BOS)
    needle: str                      # formatted with key=
    question: str
    units: Callable[[], list[str]]   # the filler, in order; each unit is tokenized on its own


STYLES = {
    "lee": HaystackStyle(INSTRUCTION, NEEDLE, QUESTION, _lee_units),
    "python": HaystackStyle("# The constant PASS_KEY is defined somewhere below among unrelated code. "
                            "Remember its value.\n", "PASS_KEY = {key}  # remember this value\n",
                            "assert PASS_KEY ==", _python_units),
}


__all__ = ["HaystackStyle", "NEEDLE", "QUESTION", "STYLES"]
