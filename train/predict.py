"""Runs a finished or interrupted run's model (its best checkpoint, merged once) on new inputs.

  python -m train.predict --workdir workdirs/sst2-minilm --text "a gripping, funny film"
  python -m train.predict --workdir workdirs/mrpc --text "He left." --text_b "He went away."
  python -m train.predict --workdir W --input rows.tsv --output predictions.jsonl     # or rows.jsonl

The run's own config.json says what it is (task, model, adapters), so no other flag is needed; `--model` points
at the base model when it moved. GLUE: the label name and its probability (STS-B: the score); from a file, one
JSON object per input row in order, {"label", "label_name", "probabilities"} ({"score"} for STS-B). Table-to-text
runs: {"prediction"} with the run's decoding settings (--beam_size, --max_new_tokens override them). The
output file is never overwritten (--overwrite to allow it); errors are one line (--verbose: the traceback).
"""

import os

from absl import app, flags, logging

from configs import glue_common, nlg_common
from train import cli, input_rows, saved_run

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (config.json and its checkpoints).")
_TEXT = flags.DEFINE_string("text", None, "One input: a sentence (GLUE) or a linearized table (table-to-text).")
_TEXT_B = flags.DEFINE_string("text_b", None, "The second sentence of a pair task (MRPC, QQP, STS-B, MNLI, ...).")
_INPUT = flags.DEFINE_string("input", None, "A TSV (with a header naming the text columns) or JSONL file of inputs.")
_OUTPUT = flags.DEFINE_string("output", None, "Where --input's predictions go (JSONL, one object per input row).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow --output to replace an existing file.")
_MODEL = flags.DEFINE_string("model", None, "The base model's new place, when it moved since the run.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Inputs per batch (0: 32 for GLUE, the run's eval_batch_size).")
_BEAM = flags.DEFINE_integer("beam_size", 0, "Table-to-text: beams (0: the run's; 1 = greedy).")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 0, "Table-to-text: most generated tokens (0: the run's).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error (also: MTLORA_DEBUG=1).")
flags.mark_flags_as_required(["workdir"])


def _job(config):
    """(the job's predict module, `model.load`'s head arguments) for a run of config.task."""
    if config.task in glue_common.TASKS:
        from train.glue import predict
        from train.glue import train as job
    elif config.task in nlg_common.NLG_TASKS:
        from train.nlg import predict
        from train.nlg import train as job
    elif config.task == "sft":
        raise ValueError(f"--workdir={_WORKDIR.value} is an instruction-tuning run: answer prompts with "
                         f"python -m train.generate --workdir {_WORKDIR.value} --prompt \"...\"")  # fmt: skip
    else:
        raise ValueError(f"{_WORKDIR.value}/config.json: task {config.task!r} is not a GLUE or table-to-text task")
    return predict, job.head(config, None)


def _describe(out: dict) -> str:
    if "score" in out:
        return f"score {out['score']:.4f}"
    if "prediction" in out:
        return out["prediction"]
    return f"{out['label_name']} ({out['probabilities'][out['label']]:.3f})"


def run() -> None:
    if (_TEXT.value is None) == (_INPUT.value is None):
        raise ValueError("pass one of --text (one input) or --input FILE (with --output FILE)")
    if _INPUT.value and not _OUTPUT.value:
        raise ValueError("--input needs --output FILE (JSONL)")
    if _OUTPUT.value and os.path.exists(_OUTPUT.value) and not _OVERWRITE.value:
        raise FileExistsError(f"--output={_OUTPUT.value} exists; pass --overwrite to replace it")
    config = saved_run.read_config(_WORKDIR.value)
    job, head = _job(config)
    rows = job.read_rows(_INPUT.value, config.task) if _INPUT.value else None
    if rows is not None and not rows:
        raise ValueError(f"--input={_INPUT.value}: no rows")
    saved = saved_run.load(_WORKDIR.value, head=head, model=_MODEL.value)
    logging.info("%s: %s checkpoint %s (step %d)", config.task, saved.which, saved.checkpoint, saved.step)
    kw = {"batch_size": _BATCH.value} if _BATCH.value else {}
    if job.__name__.endswith("nlg.predict"):
        kw.update(beam_size=_BEAM.value, max_new_tokens=_NEW_TOKENS.value)
    if rows is None:
        row = (_TEXT.value,) if _TEXT_B.value is None else (_TEXT.value, _TEXT_B.value)
        print(_describe(job.predict(saved, [row], progress=False, **kw)[0]))
        return
    outputs = job.predict(saved, rows, **kw)
    print(f"wrote {input_rows.write_jsonl(_OUTPUT.value, outputs)} predictions to {_OUTPUT.value}")


def main(argv):
    cli.tool_main(argv, run, _VERBOSE.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
