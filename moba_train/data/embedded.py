"""The embedded default corpus: real text every machine with Python (and `pip install --no-deps gensim`) has.

- `python_stdlib`: the running Python's standard library `.py` files, read in place, sorted by relative
  path (site-packages excluded): long, real code documents.
- `python_sources`: the stdlib plus every site-packages directory of the running Python (the installed
  libraries' own `.py` files): hundreds of MB of real code where torch is installed, for studies that need
  a corpus of 50M+ tokens without a download.
- `lee_corpus`: gensim's Lee background corpus, 300 real English news articles, one per line.
- `lee_sft`: one instruction conversation per Lee article, built by fixed rules (`lee_sft_conversation`),
  so article i of `lee` and record i of `lee_sft` share their held-out status.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sysconfig

from moba_train.data.skips import DataError

LEE_FILE = os.path.join("test", "test_data", "lee_background.cor")
NOT_STDLIB = ("site-packages", "dist-packages")
LEE_SFT_VERSION = 1      # bump when lee_sft_conversation changes, so cached tokens are rebuilt


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """Every `.py` file of the standard library, sorted by its path relative to the stdlib root."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if d not in NOT_STDLIB]
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return [os.path.join(root, rel) for rel in sorted(p.replace(os.sep, "/") for p in found)]


def site_packages_roots() -> list[str]:
    """The running Python's site-packages directories (system and user), existing ones, in a fixed order."""
    import site
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    return sorted({os.path.realpath(r) for r in roots if os.path.isdir(r)})


def python_source_files() -> list[str]:
    """The stdlib's `.py` files, then every site-packages root's, each root sorted by relative path."""
    found = stdlib_files()
    for root in site_packages_roots():
        rel = [os.path.relpath(os.path.join(dp, f), root) for dp, _, fs in os.walk(root) for f in fs
               if f.endswith(".py")]
        found += [os.path.join(root, r) for r in sorted(p.replace(os.sep, "/") for p in rel)]
    return found


def lee_path() -> str:
    """gensim's Lee corpus, found without importing gensim (which needs scipy)."""
    spec = importlib.util.find_spec("gensim")
    path = os.path.join(os.path.dirname(spec.origin), LEE_FILE) if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise DataError("the embedded English corpus (Lee news articles) ships in gensim's test data, which is not "
                        "installed: run `pip install --no-deps gensim` (about 28 MB, no compiled dependencies)")
    return path


def lee_articles() -> list[str]:
    with open(lee_path(), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# A sentence ends at . ! or ? (optionally closed by a quote) followed by space and a capital, digit or quote.
_SENTENCE_END = re.compile(r"""(?:(?<=[.!?])|(?<=[.!?]["']))\s+(?=["'A-Z0-9])""")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def lee_sft_conversation(index: int, article: str) -> list[dict[str, str]]:
    """Even articles (and one-sentence ones): a two-turn extraction (first, then last sentence).
    Odd articles: given the first half of the sentences, write the rest."""
    parts = sentences(article)
    if index % 2 == 0 or len(parts) < 2:
        return [
            {"role": "user", "content": f"Here is a news article:\n\n{article}\n\nWhat is its first sentence?"},
            {"role": "assistant", "content": parts[0]},
            {"role": "user", "content": "And its last sentence?"},
            {"role": "assistant", "content": parts[-1]},
        ]
    half = max(1, len(parts) // 2)
    return [
        {"role": "user", "content": "Continue this news article:\n\n" + " ".join(parts[:half])},
        {"role": "assistant", "content": " ".join(parts[half:])},
    ]
