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

import os

from absl import app, flags, logging

from train import chat, cli, conversation, generation, input_rows

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
    inputs = conversation.read_inputs(_INPUT.value) if _INPUT.value else None
    model, which = conversation.load_model(_WORKDIR.value, base_only=_BASE_ONLY.value, model=_MODEL.value)
    if model.family not in ("gpt2", "llama"):
        raise ValueError(f"--workdir={_WORKDIR.value}: a {model.family} run; train.generate needs a decoder run")
    logging.info("generating with the %s", which)
    tok = model.tokenizer
    generator = generation.Generator(model.module, model.params, stop_ids=chat.stop_ids(tok),
                                     max_new_tokens=_NEW_TOKENS.value, pad_id=chat.pad_id(tok))  # fmt: skip
    system, raw = _SYSTEM.value, _RAW.value
    prompt = lambda messages: conversation.prompt_of(tok, conversation.turns(messages, system), raw=raw)
    if inputs is None and _PROMPT.value is None:
        conversation.chat_loop(generator, tok, sampling, system=system, raw=raw)
        return
    if inputs is None:
        conversation.stream_text(tok, generator.stream(prompt([("user", _PROMPT.value)]), sampling))
        return
    answers = []
    for messages in inputs:
        ids = generator.generate(prompt(messages), sampling)
        answers.append({"prediction": tok.decode(ids, skip_special_tokens=True)})
    print(f"wrote {input_rows.write_jsonl(_OUTPUT.value, answers)} answers to {_OUTPUT.value}")


def main(argv):
    cli.tool_main(argv, run, _VERBOSE.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
