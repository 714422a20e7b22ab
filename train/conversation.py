"""A conversation with a decoder run: its model, prompts from conversations, streamed answers, the chat loop.

What `python -m train.generate` (train/generate.py, which only adds the flags) runs: `load_model` reads a workdir's
decoder with its best adapters merged (or the bare base), `prompt_of` renders a conversation with the chat template,
`read_inputs` reads a JSONL of conversations, `stream_text` prints a token stream as it grows, and `chat_loop` keeps a
conversation on stdin.
"""

import sys

from train import chat, input_rows, saved_run
from train import model as model_lib


def load_model(workdir: str, *, base_only: bool, model: str | None = None) -> tuple[model_lib.Model, str]:
    """(the run's decoder with its best adapters, or the bare base model, and a line saying which)."""
    if base_only:
        config = saved_run.read_config(workdir)
        with config.unlocked():
            config.model = model or config.model
        return model_lib.load(config, head="lm"), f"base model {config.model} (no adapters)"
    saved = saved_run.load(workdir, head={"head": "lm"}, model=model)
    return saved.model._replace(params=saved.merged), f"{saved.which} checkpoint {saved.checkpoint}"


def turns(messages, system: str | None) -> list[tuple[str, str]]:
    """The conversation's turns with `system` (if any) first."""
    return ([("system", system)] if system else []) + list(messages)


def prompt_of(tokenizer, messages, *, raw: bool) -> list[int]:
    """The prompt ids of a conversation ending with a user turn (raw: the last user message as it is)."""
    if raw:
        return chat.prompt_ids(tokenizer, prompt=messages[-1][1])
    return chat.prompt_ids(tokenizer, messages=messages)


def read_inputs(path: str) -> list[list[tuple[str, str]]]:
    """The conversation of every row (up to its last user turn); errors name file:line."""
    out = []
    for line, obj in input_rows.jsonl_rows(path):
        if isinstance(obj.get("prompt"), str):
            out.append([("user", obj["prompt"])])
            continue
        turns = obj.get("messages")
        ok = isinstance(turns, list) and all(isinstance(t, dict) and {"role", "content"} <= set(t) for t in turns)
        users = [i for i, t in enumerate(turns or []) if isinstance(t, dict) and t.get("role") == "user"] if ok else []
        if not users:
            raise ValueError(f"{path}:{line}: expected {{\"prompt\": str}} or {{\"messages\": [...]}} with a user "
                             f"turn; found keys {', '.join(obj) or 'nothing'}")  # fmt: skip
        out.append([(t["role"], t["content"]) for t in turns[: users[-1] + 1]])
    if not out:
        raise ValueError(f"--input={path}: no rows")
    return out


def stream_text(tokenizer, ids_stream, out=sys.stdout) -> str:
    """Prints the text of a token stream as it grows (whole characters only) and returns it."""
    ids, shown = [], ""
    for token in ids_stream:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    out.write(text[len(shown) :] + "\n")
    out.flush()
    return text


def chat_loop(generator, tokenizer, sampling, *, system, raw: bool, lines=sys.stdin, out=sys.stdout) -> None:
    """The interactive loop: each line is a user turn; the answers stream; the conversation is kept."""
    messages = []
    out.write("chat: an empty line or end of input ends it, /reset starts over\n")
    while True:
        out.write("> ")
        out.flush()
        line = lines.readline()
        if not line.strip():
            return
        if line.strip() == "/reset":
            messages = []
            continue
        messages.append(("user", line.rstrip("\n")))
        ids = prompt_of(tokenizer, turns(messages, system), raw=raw)
        messages.append(("assistant", stream_text(tokenizer, generator.stream(ids, sampling), out)))
