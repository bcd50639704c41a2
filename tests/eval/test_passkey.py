"""Passkey haystacks (exact length, key at its depth) and scoring by greedy generation."""

import re
from types import SimpleNamespace

import pytest
import torch

from moba_train.data.haystacks import NEEDLE, QUESTION
from moba_train.eval.passkey import Haystacks, passkey_lengths, run_passkey, trial_key
from moba_train.models import AttentionPlan, attach_plan, build_from_config


def find(seq: list[int], sub: list[int]) -> int:
    return next(i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub)


@pytest.fixture(scope="module")
def haystacks(lee_bpe):
    return Haystacks(lee_bpe)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0], ids=lambda d: f"depth{d}")
@pytest.mark.parametrize("length", [256, 1000, 4096], ids=lambda n: f"len{n}")
def test_haystack_is_exact_and_holds_the_key_at_its_depth(haystacks, lee_bpe, length, depth):
    key = trial_key(0, length, depth, 0)
    ids = haystacks.build(length, depth, key)
    assert len(ids) == length
    needle = lee_bpe(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    question = lee_bpe(QUESTION, add_special_tokens=False)["input_ids"]
    assert ids[-len(question):] == question and ids[:len(haystacks.prefix)] == haystacks.prefix
    filler = length - len(haystacks.prefix) - len(needle) - len(question)
    at = find(ids, needle) - len(haystacks.prefix)
    longest_sentence = max(len(s) for s in haystacks.sentences)
    assert abs(at - depth * filler) <= longest_sentence / 2 + 1       # the nearest sentence boundary
    assert lee_bpe.decode(ids).count(key) == 2


def test_haystack_too_short_names_the_minimum(haystacks):
    with pytest.raises(ValueError, match="use lengths >="):
        haystacks.build(20, 0.5, "12345")


def test_keys_are_deterministic_five_digit_numbers():
    keys = {trial_key(0, n, d, s) for n in (256, 512) for d in (0.1, 0.9) for s in range(3)}
    assert len(keys) == 12 and all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys)
    assert trial_key(3, 256, 0.5, 1) == trial_key(3, 256, 0.5, 1)


def test_lengths_up_to_the_stage_and_the_cap():
    assert passkey_lengths(None, 4096, 2048) == ([], [4096])
    assert passkey_lengths([512, 1024, 8192], 4096, 1024) == ([512, 1024], [])
    assert passkey_lengths([256, 2048], None, 1024) == ([256], [2048])


class KeyReader(torch.nn.Module):
    """Stands in for a model that retrieves perfectly: it 'generates' the key found in its prompt."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.batches = []                            # the batch size of each generate call
        self.needle_at = []                          # per row generated, the needle's place in its text (0..1)

    def forward(self, input_ids, cache=None):      # only its signature is read: the cache keyword
        raise NotImplementedError

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus, cache):
        assert cache.get_max_length() == input_ids.shape[1] + generation_config.max_new_tokens
        self.batches.append(input_ids.shape[0])
        texts = [self.tokenizer.decode(row) for row in input_ids]
        found = [re.search(r"pass key is (\d+)", text) for text in texts]
        self.needle_at += [m.start() / len(text) for m, text in zip(found, texts)]   # where each row's needle sits
        keys = [m.group(1) for m in found]
        n = generation_config.max_new_tokens
        answers = [self.tokenizer(f" {key}.", add_special_tokens=False)["input_ids"][:n] for key in keys]
        pad = generation_config.pad_token_id
        answers = torch.tensor([a + [pad] * (n - len(a)) for a in answers])   # generate pads finished rows
        return torch.cat([input_ids, answers], dim=1)


def test_scoring_counts_the_first_generated_number(lee_bpe, haystacks):
    result = run_passkey(KeyReader(lee_bpe), lee_bpe, [256, 512], [0.2, 0.8], samples=2, haystacks=haystacks)
    assert result.accuracy == 1.0 and result.accuracy_grid == [[1.0, 1.0], [1.0, 1.0]]
    assert all(t.correct and t.answer.strip().startswith(t.key) for t in result.trials)


@pytest.mark.parametrize("batch_tokens,batches", [(256, [1] * 12), (1280, [5, 5, 2]), (4096, [12])],
                         ids=["one-at-a-time", "fives-across-depths", "every-trial"])
def test_trials_of_a_length_are_generated_together_across_depths_up_to_batch_tokens(lee_bpe, haystacks,
                                                                                    batch_tokens, batches):
    reader = KeyReader(lee_bpe)
    result = run_passkey(reader, lee_bpe, [256], [0.2, 0.4, 0.6, 0.8], samples=3, haystacks=haystacks,
                         batch_tokens=batch_tokens)
    assert reader.batches == batches
    assert result.accuracy == 1.0 and len(result.trials) == 12
    assert len({t.key for t in result.trials}) == 12          # every sample its own key, whatever the batching
    # each trial keeps its depth: recorded in order, and the needle sits deeper in the haystacks of deeper trials
    # (on average over a depth's samples: at 256 tokens sentence boundaries move a single needle by 0.1-0.2)
    assert [t.depth for t in result.trials] == [d for d in (0.2, 0.4, 0.6, 0.8) for _ in range(3)]
    by_depth = [sum(reader.needle_at[i:i + 3]) / 3 for i in range(0, 12, 3)]
    assert by_depth == sorted(by_depth) and by_depth[-1] - by_depth[0] > 0.3, by_depth


def test_batched_generation_answers_as_one_at_a_time_on_a_moba_model(lee_bpe, haystacks):
    model = build_from_config(dict(model_type="llama", vocab_size=len(lee_bpe), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
    attach_plan(model, AttentionPlan.from_config({"block_size": 64, "topk": 2, "moba_layers": "all"}, 2))
    one, batched = (run_passkey(model, lee_bpe, [320], [0.3, 0.7], samples=3, haystacks=haystacks, batch_tokens=n)
                    for n in (320, 960))
    assert [(t.key, t.answer) for t in one.trials] == [(t.key, t.answer) for t in batched.trials]


def test_tiny_moba_model_generates_and_the_result_has_the_grid_shape(lee_bpe, haystacks):
    model = build_from_config(dict(model_type="llama", vocab_size=len(lee_bpe), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
    attach_plan(model, AttentionPlan.from_config({"block_size": 64, "topk": 2, "moba_layers": "all"}, 2))
    model.train()
    rng = torch.get_rng_state()
    result = run_passkey(model, lee_bpe, [256, 384], [0.1, 0.5, 0.9], haystacks=haystacks)
    assert torch.equal(torch.get_rng_state(), rng)            # greedy: the training RNG stream is untouched
    assert model.training                                     # restored after evaluation
    assert len(result.trials) == 6
    assert [len(row) for row in result.accuracy_grid] == [2, 2, 2]
    assert all(a in (0.0, 1.0) for row in result.accuracy_grid for a in row)
    assert all(isinstance(t.answer, str) and t.answer for t in result.trials)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0], ids=lambda d: f"depth{d}")
def test_python_haystack_is_code_with_the_key_as_a_constant(lee_bpe, depth):
    from moba_train.data.haystacks import STYLES

    code = Haystacks(lee_bpe, "python")
    key = trial_key(0, 2048, depth, 0)
    ids = code.build(2048, depth, key)
    assert len(ids) == 2048
    text = lee_bpe.decode(ids)
    assert text.rstrip().endswith(STYLES["python"].question) and f"PASS_KEY = {key}" in text
    assert text.count("PASS_KEY") == 3 and "def " in text          # instruction, needle, question; real code
    before = text.index(f"PASS_KEY = {key}") - len(lee_bpe.decode(code.prefix))
    assert abs(before / (len(text) - len(lee_bpe.decode(code.prefix))) - depth) < 0.1


def test_unknown_haystack_style_is_named(lee_bpe):
    with pytest.raises(ValueError, match="choose one of"):
        Haystacks(lee_bpe, "klingon")


@pytest.mark.parametrize("written", [None, 1000], ids=["default", "user-set"])
def test_the_batch_tokens_a_user_writes_are_the_ones_the_stage_end_generation_uses(monkeypatch, written):
    from moba_train.config.run import PasskeyConfig, load_run_config
    from moba_train.eval import stage_end
    from tests.trainer.compose import compose_config

    overrides = ["recipe=tiny", "eval.passkey.lengths=[256]"]
    cfg = load_run_config(compose_config(overrides + ([f"eval.passkey.batch_tokens={written}"] if written else [])))
    seen = []
    monkeypatch.setattr(stage_end, "run_passkey",
                        lambda *args, **kwargs: seen.append(kwargs["batch_tokens"]) or SimpleNamespace())
    ev = SimpleNamespace(cfg=cfg, stage=cfg.stages[0], lm=None, tokenizer=None, zero3=False, world=1)
    stage_end.stage_passkey(ev)
    assert seen == [written or PasskeyConfig.batch_tokens] * len(cfg.eval.passkey.haystacks)
