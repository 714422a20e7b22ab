"""Talks to a fine-tuned decoder: the run's model with its best adapters merged once (train/saved_run.py).

  python -m train.generate --workdir W --prompt "Give three tips for staying healthy."
  python -m train.generate --workdir W                        # a chat on stdin that keeps the conversation
  python -m train.generate --workdir W --input prompts.jsonl --output answers.jsonl
  python -m train.generate --workdir W --base_only --prompt "..."   # the base model, to compare

A prompt is one user message rendered with the tokenizer's chat template (with `--system`, a system turn first;
`--raw`: the text as it is, no template). Input rows are {"messages": [...]} (the conversation up to its last
user turn is answered) or {"prompt": str}; each gets {"prediction": str}, in order, written atomically (never
over an existing file without --overwrite). Decoding is greedy unless --temperature > 0 (then --top_p,
--top_k, --seed); it stops at eos or the template's end-of-turn token, or after --max_new_tokens. In the chat,
tokens are printed as they are produced; an empty line or end of input ends it, "/reset" starts over.
Works for every decoder run (train.sft, train.nlg); errors are one line (--verbose: the traceback).
"""

import json
import os
import sys

from absl import app, flags, logging

from train import chat, cli, generation, input_rows, saved_run
from train import model as model_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (config.json and its checkpoints).")
_PROMPT = flags.DEFINE_string("prompt", None, "One user message to answer (none: a chat on stdin).")
_SYSTEM = flags.DEFINE_string("system", None, "A system message put before the conversation.")
_RAW = flags.DEFINE_bool("raw", False, "Send prompts as they are, without the chat template.")
_INPUT = flags.DEFINE_string("input", None, 'A JSONL file of {"messages": [...]} or {"prompt": str} rows.')
_OUTPUT = flags.DEFINE_string("output", None, 'Where --input\'s answers go (JSONL, one {"prediction"} per row).')
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow --output to replace an existing file.")
_BASE_ONLY = flags.DEFINE_bool("base_only", False, "Run the base model without the run's adapters.")
_MODEL = flags.DEFINE_string("model", None, "The base model's new place, when it moved since the run.")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Most tokens generated per answer.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely tokens up to this mass.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (the same seed gives the same answer).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error (also: MTLORA_DEBUG=1).")
flags.mark_flags_as_required(["workdir"])


def load_model(workdir: str, *, base_only: bool, model: str | None = None) -> tuple[model_lib.Model, str]:
    """(the run's decoder with its best adapters, or the bare base model, and a line saying which)."""
    if base_only:
        config = saved_run.read_config(workdir)
        with config.unlocked():
            config.model = model or config.model
        return model_lib.load(config, head="lm"), f"base model {config.model} (no adapters)"
    saved = saved_run.load(workdir, head={"head": "lm"}, model=model)
    return saved.model._replace(params=saved.merged), f"{saved.which} checkpoint {saved.checkpoint}"


def conversation(messages, system: str | None) -> list[tuple[str, str]]:
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
        ids = prompt_of(tokenizer, conversation(messages, system), raw=raw)
        messages.append(("assistant", stream_text(tokenizer, generator.stream(ids, sampling), out)))


def run() -> None:
    if _INPUT.value and _PROMPT.value is not None:
        raise ValueError("pass --prompt or --input, not both")
    if _INPUT.value and not _OUTPUT.value:
        raise ValueError("--input needs --output FILE (JSONL)")
    if _OUTPUT.value and os.path.exists(_OUTPUT.value) and not _OVERWRITE.value:
        raise FileExistsError(f"--output={_OUTPUT.value} exists; pass --overwrite to replace it")
    if _NEW_TOKENS.value <= 0:
        raise ValueError(f"--max_new_tokens={_NEW_TOKENS.value}: expected > 0")
    sampling = generation.check_sampling(
        generation.Sampling(_TEMPERATURE.value, _TOP_P.value, _TOP_K.value, _SEED.value)
    )
    inputs = read_inputs(_INPUT.value) if _INPUT.value else None
    model, which = load_model(_WORKDIR.value, base_only=_BASE_ONLY.value, model=_MODEL.value)
    if model.family not in ("gpt2", "llama"):
        raise ValueError(f"--workdir={_WORKDIR.value}: a {model.family} run; train.generate needs a decoder run")
    logging.info("generating with the %s", which)
    tok = model.tokenizer
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    generator = generation.Generator(model.module, model.params, stop_ids=chat.stop_ids(tok),
                                     max_new_tokens=_NEW_TOKENS.value, pad_id=pad)  # fmt: skip
    system, raw = _SYSTEM.value, _RAW.value
    if inputs is None and _PROMPT.value is None:
        chat_loop(generator, tok, sampling, system=system, raw=raw)
        return
    if inputs is None:
        stream_text(tok, generator.stream(prompt_of(tok, conversation([("user", _PROMPT.value)], system), raw=raw),
                                          sampling))  # fmt: skip
        return
    answers = []
    for messages in inputs:
        ids = generator.generate(prompt_of(tok, conversation(messages, system), raw=raw), sampling)
        answers.append({"prediction": tok.decode(ids, skip_special_tokens=True)})
    tmp = f"{_OUTPUT.value}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(a) + "\n" for a in answers)
    os.replace(tmp, _OUTPUT.value)
    print(f"wrote {len(answers)} answers to {_OUTPUT.value}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    cli.guarded(run, verbose=_VERBOSE.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
