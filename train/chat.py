"""Chat prompts shared by train.sft and train.generate: the tokenizer's chat template, the stop tokens, prompt ids.

A conversation is a sequence of (role, content) pairs. The chat template is the tokenizer's own
(`tokenizer.chat_template`: HF tokenizer_config.json / chat_template.jinja, or the GGUF's
`tokenizer.chat_template`); without one, a single user turn uses the Alpaca prompt (Taori et al. 2023).
"""

from collections.abc import Sequence

# Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca), for Alpaca rows when the tokenizer has no chat template.
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the " \
                "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"  # fmt: skip
# End-of-turn tokens of common chat templates (ChatML, Llama 3, Phi-3, Gemma); those the template writes stop
# generation beside eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: Sequence[tuple[str, str]], *, generation_prompt: bool = False) -> str:
    """The chat template's text of `messages` ((role, content) pairs)."""
    turns = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def token_ids(tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of `text` (special: with the tokenizer's own BOS / EOS additions)."""
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def pad_id(tokenizer) -> int:
    """The padding token: the tokenizer's own, else eos."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end a generated answer: eos and the end-of-turn tokens the chat template writes."""
    stops = {tokenizer.eos_token_id} - {None}
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()
    stops |= {vocab[t] for t in END_OF_TURN if t in template and t in vocab}
    return tuple(sorted(stops))


def prompt_ids(tokenizer, messages: Sequence[tuple[str, str]] | None = None, prompt: str | None = None) -> list[int]:
    """The tokens a generation starts from: `messages` rendered with the generation prompt (the chat template,
    else the Alpaca prompt for one user turn), or a raw `prompt` (with the tokenizer's BOS if it adds one)."""
    if messages is None:
        return token_ids(tokenizer, prompt, special=True)
    if has_chat_template(tokenizer):
        return token_ids(tokenizer, render(tokenizer, messages, generation_prompt=True))
    users = [content for role, content in messages if role == "user"]
    if len(messages) != 1 or not users:
        raise ValueError("the model's tokenizer has no chat template: give one user message, or a raw prompt")
    return token_ids(tokenizer, ALPACA_PROMPT.format(instruction=users[0]), special=True)
