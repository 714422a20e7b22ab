"""Generations of a saved table-to-text run (train/saved_run.py) on new inputs: the NLG part of train.predict.

An input is a linearized table (`context`), as the run was trained on: e.g. WebNLG `Alan_Bean : nationality :
United_States`. Inputs come from `--text`, JSONL objects with a "context" (or "input") key, or a TSV with a
`context` column; each gets `{"prediction": str}` decoded with the run's settings (beam size, length penalty,
no-repeat n-gram size, max new tokens), which `beam_size` / `max_new_tokens` may override.
"""

from train import input_rows
from train import mesh as mesh_lib
from train.nlg import evaluation as nlg_eval

KEYS = ("context", "input")


def read_rows(path: str, task: str) -> list[tuple[str]]:
    """The context of every row of a JSONL or TSV (header with a `context` column) file; errors name file:line."""
    if input_rows.is_jsonl(path):
        rows = []
        for i, obj in input_rows.jsonl_rows(path):
            key = next((k for k in KEYS if isinstance(obj.get(k), str)), None)
            if key is None:
                raise ValueError(f"{path}:{i}: no 'context' text for {task} (found {', '.join(obj) or 'nothing'})")
            rows.append((obj[key],))
        return rows
    header, lines = input_rows.tsv_rows(path)
    col = next((header.index(k) for k in KEYS if k in header), None)
    if col is None:
        raise ValueError(f"{path}:1: no 'context' column for {task} (found {', '.join(header) or 'nothing'})")
    return [(fields[col],) for _, fields in lines]


def predict(run, rows, *, beam_size: int = 0, max_new_tokens: int = 0, batch_size: int = 0, progress: bool = True):
    """{"prediction": text} per row, decoded with the run's settings (0 = keep the run's value)."""
    config = run.config
    with config.unlocked():
        config.beam_size = beam_size or config.beam_size
        config.max_new_tokens = max_new_tokens or config.max_new_tokens
        config.eval_batch_size = batch_size or config.eval_batch_size
    mesh = mesh_lib.make_mesh({"data": 1})
    generate = nlg_eval.make_generate(run.model.module, run.model.tokenizer, config, mesh)
    return [{"prediction": text} for text in generate(run.model.params, [r[0] for r in rows])]
