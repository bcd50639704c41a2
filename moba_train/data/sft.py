"""Conversations to text segments, each marked as a training target (the assistant's) or not.

The conversation is rendered with the tokenizer's chat template (or PLAIN_CHAT_TEMPLATE when it has none).
Each assistant turn's span is found by rendering the conversation up to the turn with the generation
prompt and up to the end of the turn: the text in between is the assistant's content and its end-of-turn
token. Whitespace the template puts after the turn is not a target. Segments are tokenized one by one, so
the prompt ends on the same token boundary as at inference, where the prompt is tokenized alone.
"""

from __future__ import annotations

import logging

from moba_train.data.skips import DataError, SkipLog

log = logging.getLogger(__name__)

# The documented plain template (docs/data.md) for tokenizers without a chat template:
#   ### User:\n{content}\n\n### Assistant:\n{content}{eos}\n\n
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

Segments = list[tuple[str, bool]]   # (text, is_target)


def resolve_chat_template(tokenizer, setting: str | None) -> str:
    """None: the tokenizer's own template, else the plain one; "plain": the plain one; else a Jinja string."""
    if setting == "plain":
        return PLAIN_CHAT_TEMPLATE
    if setting is not None:
        return setting
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):   # several named templates: the default one renders conversations
        own = own.get("default")
    if own:
        return own
    log.info("the tokenizer has no chat template; SFT records use the plain template (docs/data.md)")
    return PLAIN_CHAT_TEMPLATE


class ChatRenderer:
    def __init__(self, tokenizer, template: str):
        if template == PLAIN_CHAT_TEMPLATE and tokenizer.eos_token is None:
            raise DataError("the plain chat template ends assistant turns with the EOS token, and this tokenizer "
                            "has none; set data.chat_template to a template of your own")
        self.tokenizer = tokenizer
        self.template = template

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def segments(self, messages: list[dict], skips: SkipLog, where: str) -> Segments | None:
        """Target and non-target segments whose concatenation is the rendered conversation."""
        import jinja2
        try:
            full = self.render(messages, False)
            segments, done = [], 0
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                before = self.render(messages[:i], True)
                through = self.render(messages[: i + 1], False)
                if not (through.startswith(before) and full.startswith(through) and len(before) >= done):
                    raise DataError(
                        f"the chat template does not render conversations prefix by prefix (turn {i} of {where}), "
                        f"so the assistant's tokens cannot be located; set data.chat_template to 'plain' or to a "
                        f"template that renders each turn the same way whatever follows it")
                end = max(len(before), len(through.rstrip()))
                segments += [(full[done:len(before)], False), (full[len(before):end], True)]
                done = end
        except jinja2.TemplateError as e:
            skips.skip("the chat template rejected the conversation", f"{where} ({e})")
            return None
        segments.append((full[done:], False))
        return [(text, target) for text, target in segments if text]
