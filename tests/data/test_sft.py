"""SFT: chat-template rendering, labels on the assistant's tokens only, plain template, token-weighted loss."""

from __future__ import annotations

import json

import pytest

from moba_train.data import DataError, build_stage_data, count_target_tokens
from moba_train.data.embedded import lee_articles, lee_sft_conversation, sentences
from moba_train.data.sft import PLAIN_CHAT_TEMPLATE, ChatRenderer
from moba_train.data.skips import SkipLog

CONVERSATIONS = [
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome, since 1871."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."},
     {"role": "user", "content": "Thanks"}],          # a trailing user turn is context only
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_batches(tokenizer, source: dict, tmp_path, seq_len=512, steps=4, data_extra=None):
    data = {"num_proc": 1, "sources": {"chat": {"holdout_fraction": 0.0, **source}}, **(data_extra or {})}
    stage = build_stage_data(data, {"mix": {"chat": 1.0}}, tokenizer, seq_len=seq_len, micro_batch_size=1,
                             mode="sft", seed=0, cache_dir=str(tmp_path / "cache"))
    return [next(stage) for _ in range(steps)]


def targets_per_document(batch, tokenizer) -> list[tuple[str, list[str]]]:
    """(decoded document, decoded runs of target tokens) for every non-padding document of a micro-batch."""
    ids, labels = batch["input_ids"].reshape(-1), batch["shift_labels"].reshape(-1)
    cu = batch["cu_seqlens"].tolist()
    out = []
    for a, e in zip(cu[:-1], cu[1:]):
        lab = labels[a:e]
        if (lab == -100).all():
            continue
        runs, run = [], []
        for t in lab.tolist() + [-100]:
            if t == -100 and run:
                runs.append(tokenizer.decode(run))
                run = []
            elif t != -100:
                run.append(t)
        out.append((tokenizer.decode(ids[a:e].tolist()), runs))
    return out


def expected_runs(conversation, end_of_turn: str) -> list[str]:
    return [m["content"] + end_of_turn for m in conversation if m["role"] == "assistant"]


def check_labels(batches, tokenizer, conversations, end_of_turn):
    checked = 0
    for batch in batches:
        for text, runs in targets_per_document(batch, tokenizer):
            conv = next(c for c in conversations if c[0 if c[0]["role"] != "system" else 1]["content"] in text)
            assert runs == expected_runs(conv, end_of_turn)
            checked += 1
    assert checked >= len(conversations)


def test_labels_cover_exactly_the_assistant_turns_with_the_chat_template(smollm2, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    batches = sft_batches(smollm2, {"format": "jsonl", "path": path, "messages_field": "messages"}, tmp_path)
    check_labels(batches, smollm2, CONVERSATIONS, "<|im_end|>")
    text, _ = targets_per_document(batches[0], smollm2)[0]
    assert text.startswith("<|im_start|>")          # rendered by SmolLM2's own ChatML template


def test_plain_template_when_the_tokenizer_has_none(lee_bpe, tmp_path):
    assert not getattr(lee_bpe, "chat_template", None)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    batches = sft_batches(lee_bpe, {"format": "jsonl", "path": path, "messages_field": "messages"}, tmp_path)
    check_labels(batches, lee_bpe, CONVERSATIONS, "<|endoftext|>")
    rendered = ChatRenderer(lee_bpe, PLAIN_CHAT_TEMPLATE).render(CONVERSATIONS[1], False)
    assert rendered == "### User:\nSay hello.\n\n### Assistant:\nHello there!<|endoftext|>\n\n"


def test_instruction_records(smollm2, tmp_path):
    rows = [{"q": "2+2?", "a": "4"}, {"q": "Colour of the sky?", "a": "Blue, on a clear day."}]
    path = write_jsonl(tmp_path / "inst.jsonl", rows)
    batches = sft_batches(smollm2, {"format": "jsonl", "path": path, "prompt_field": "q", "response_field": "a"},
                          tmp_path, seq_len=256)
    convs = [[{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}] for r in rows]
    check_labels(batches, smollm2, convs, "<|im_end|>")


def test_prompt_tokens_end_where_inference_prompts_end(smollm2):
    """Segments are tokenized separately: the prompt's tokens equal the tokens of the prompt rendered alone."""
    renderer = ChatRenderer(smollm2, smollm2.chat_template)
    segments = renderer.segments(CONVERSATIONS[1], SkipLog("t"), "here")
    prompt = renderer.render(CONVERSATIONS[1][:1], True)
    assert segments[0] == (prompt, False) and segments[1] == ("Hello there!<|im_end|>", True)
    assert "".join(t for t, _ in segments) == renderer.render(CONVERSATIONS[1], False)


def test_template_that_is_not_prefix_stable_is_refused(lee_bpe, tmp_path):
    template = "{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    with pytest.raises(DataError, match="prefix by prefix"):
        sft_batches(lee_bpe, {"format": "jsonl", "path": path, "messages_field": "messages"}, tmp_path,
                    data_extra={"chat_template": template})


def test_conversations_the_template_rejects_are_counted_skips(lee_bpe, tmp_path):
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
                + PLAIN_CHAT_TEMPLATE)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    data = {"num_proc": 1, "chat_template": template,
            "sources": {"chat": {"format": "jsonl", "path": path, "messages_field": "messages", "holdout_fraction": 0}}}
    stage = build_stage_data(data, {}, lee_bpe, seq_len=256, micro_batch_size=1, mode="sft", seed=0,
                             cache_dir=str(tmp_path / "cache"))
    assert "1 x the chat template rejected the conversation" in stage.report()
    assert stage.sources["chat"].n_docs == 2


def test_lee_sft_records_are_real_extractions():
    articles = lee_articles()
    even, odd = lee_sft_conversation(0, articles[0]), lee_sft_conversation(1, articles[1])
    assert articles[0] in even[0]["content"] and even[1]["content"] == sentences(articles[0])[0]
    assert even[3]["content"] == sentences(articles[0])[-1] and articles[0].endswith(even[3]["content"])
    prompt, answer = odd[0]["content"].split("\n\n", 1)[1], odd[1]["content"]
    assert f"{prompt} {answer}" == " ".join(sentences(articles[1])) and articles[1].startswith(prompt)


def test_count_target_tokens_counts_the_assistant_tokens(smollm2, tmp_path):
    """The loss weight of a micro-batch (for a token-weighted mean over micro-batches and ranks) is the number
    of assistant tokens in it, counted here independently from the conversations."""
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    batches = sft_batches(smollm2, {"format": "jsonl", "path": path, "messages_field": "messages"}, tmp_path,
                          seq_len=128, steps=3)
    for batch in batches:
        expected = 0
        for text, _ in targets_per_document(batch, smollm2):
            conv = next(c for c in CONVERSATIONS if c[0 if c[0]["role"] != "system" else 1]["content"] in text)
            expected += sum(len(smollm2.encode(run, add_special_tokens=False))
                            for run in expected_runs(conv, "<|im_end|>"))
        assert count_target_tokens(batch) == expected > 0


def test_conversations_longer_than_the_pack_are_dropped_never_cut(lee_bpe, tmp_path):
    """A cut conversation would give packs of prompt without targets; SFT keeps conversations whole."""
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "A long answer."}]
    rows = [{"messages": c} for c in CONVERSATIONS] + [{"messages": long}] * 3
    source = {"format": "jsonl", "path": write_jsonl(tmp_path / "chat.jsonl", rows), "messages_field": "messages"}
    for batch in sft_batches(lee_bpe, source, tmp_path, seq_len=128, steps=6):
        assert count_target_tokens(batch) > 0
        assert "word word" not in lee_bpe.decode(batch["input_ids"].reshape(-1).tolist())
