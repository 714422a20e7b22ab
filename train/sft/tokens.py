"""Rows (train/sft/rows.py) -> token ids and the tokens the loss covers.

Chat and Alpaca rows are rendered with the tokenizer's own chat template (`tokenizer.chat_template`: HF
tokenizer_config.json's, or the GGUF's `tokenizer.chat_template`). The loss covers the assistant turns only:
assistant turn i spans, in the rendered conversation, from the end of `template(messages[:i],
add_generation_prompt=True)` to the end of `template(messages[:i + 1])` (its end-of-turn tokens included); the
template must render every conversation as a prefix of its continuation (the common templates do), else the
row is an error. Alpaca rows without a chat template use the Alpaca prompt (Taori et al. 2023); chat rows
without one are an error. Prompt / completion rows train on `completion + eos` after `prompt`; text rows on
every token of `text + eos`. Each text segment is tokenized alone, without special tokens (the template
writes its own; a prompt or text row starts with the tokenizer's BOS when it adds one).

A sequence longer than `max_length + 1` tokens keeps its first `max_length + 1` (max_length next-token
positions); the truncated rows are counted, never dropped.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from train import chat
from train.sft.rows import Row


class Encoded(NamedTuple):
    """One row as tokens. tokens: [n] int32; targets: [n] bool, True where the token is trained on."""

    tokens: np.ndarray
    targets: np.ndarray


def _first_prefix(tokenizer) -> str:
    """The template's text before the content of an assistant turn that opens a conversation (its default system
    prompt and turn header): the rendering of a one-turn chat up to a marker content."""
    marker = "\x00assistant-content\x00"
    text = chat.render(tokenizer, [("assistant", marker)])
    return text[: text.index(marker)]


def chat_segments(tokenizer, messages, where: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) segments: assistant turns trained, the rest not."""
    full = chat.render(tokenizer, messages)
    segments, pos = [], 0
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prefix = chat.render(tokenizer, messages[:i], generation_prompt=True) if i else _first_prefix(tokenizer)
        through, start = chat.render(tokenizer, messages[: i + 1]), len(prefix)
        if start < pos or not through.startswith(prefix) or not full.startswith(through):
            raise ValueError(f"{where}: the chat template does not render this conversation as a prefix of its "
                             f"continuation, so its assistant turns cannot be located")  # fmt: skip
        segments += [(full[pos:start], False), (full[start : len(through)], True)]
        pos = len(through)
    segments.append((full[pos:], False))
    return [(text, trained) for text, trained in segments if text]


def encode(tokenizer, row: Row) -> Encoded:
    """The tokens of one row and which of them the loss covers (module docstring)."""
    if row.messages is not None and (chat.has_chat_template(tokenizer) or row.fmt != "alpaca"):
        if not chat.has_chat_template(tokenizer):
            raise ValueError(
                f"{row.where}: a chat row, but the model's tokenizer has no chat template "
                "(tokenizer_config.json 'chat_template', or the GGUF's tokenizer.chat_template)"
            )
        segments = chat_segments(tokenizer, row.messages, row.where)
        pieces = [(chat.token_ids(tokenizer, text), trained) for text, trained in segments]
    else:
        if row.messages is not None:  # alpaca without a chat template
            prompt, completion = chat.ALPACA_PROMPT.format(instruction=row.messages[0][1]), row.messages[1][1]
        else:
            prompt, completion = row.prompt, row.completion
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{row.where}: the tokenizer has no eos token to end the completion with")
        text_row = row.fmt == "text"
        first = chat.token_ids(tokenizer, completion if text_row else prompt, special=True)
        rest = [] if text_row else chat.token_ids(tokenizer, completion)
        pieces = [(first, text_row), (rest + [eos], True)]
    tokens = np.asarray([t for ids, _ in pieces for t in ids], np.int32)
    targets = np.asarray([trained for ids, trained in pieces for _ in ids], bool)
    return Encoded(tokens, targets)


def encode_all(tokenizer, rows: Sequence[Row], max_length: int) -> tuple[list[Encoded], dict[str, int]]:
    """Every row encoded and cut to max_length + 1 tokens; counts of "truncated" rows and of rows that lost
    every target token to the cut ("truncated_no_target")."""
    out, counts = [], {"truncated": 0, "truncated_no_target": 0}
    for row in rows:
        enc = encode(tokenizer, row)
        if len(enc.tokens) > max_length + 1:
            enc = Encoded(enc.tokens[: max_length + 1], enc.targets[: max_length + 1])
            counts["truncated"] += 1
            counts["truncated_no_target"] += int(not enc.targets[1:].any())
        out.append(enc)
    return out, counts
