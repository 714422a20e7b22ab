"""GLUE predictions of a saved run (train/saved_run.py) on new text: the GLUE part of `python -m train.predict`.

Inputs are rows of the task's text columns: a TSV with a header naming them, or JSONL objects with those keys.
The names accepted are the task's HF / TFDS feature names (`sentence`; `sentence1`, `sentence2`; `question1`,
`question2`; `premise`, `hypothesis`; `question`, `sentence`) or the columns of its official dev file
(`#1 String`, `#2 String` for MRPC). Outputs, one per row in order: `{"label", "label_name", "probabilities"}`
(softmax of the head's logits), or `{"score"}` for STS-B.
"""

from collections.abc import Sequence

import jax
import numpy as np
import tqdm

from train import batching, input_rows, saved_run
from train.glue import data as glue_data
from train.glue import pipeline
from train.glue import tasks as glue_tasks
from train.glue import train as glue_train


def text_columns(task: str) -> list[tuple[str, ...]]:
    """The accepted names of the task's text columns, in order of preference."""
    spec = glue_tasks.get_task(task)
    names = [tuple(spec.hf_text), tuple(spec.files["dev"].text)]
    return [n for i, n in enumerate(names) if n not in names[:i]]


def _pick(keys, task: str, where: str) -> tuple[str, ...]:
    for names in text_columns(task):
        if all(n in keys for n in names):
            return names
    want = " or ".join("/".join(n) for n in text_columns(task))
    raise ValueError(f"{where}: no {want} column for {task} (found {', '.join(map(str, keys)) or 'nothing'})")


def read_rows(path: str, task: str) -> list[tuple[str, ...]]:
    """The text columns of every row of a TSV (with a header) or JSONL file; errors name file:line."""
    if input_rows.is_jsonl(path):
        rows, names = [], None
        for i, obj in input_rows.jsonl_rows(path):
            names = names or _pick(obj, task, f"{path}:{i}")
            missing = [n for n in names if not isinstance(obj.get(n), str)]
            if missing:
                raise ValueError(f"{path}:{i}: row has no text {missing[0]!r} (keys: {', '.join(obj)})")
            rows.append(tuple(obj[n] for n in names))
        return rows
    header, lines = input_rows.tsv_rows(path)
    cols = [header.index(n) for n in _pick(header, task, f"{path}:1")]
    return [tuple(fields[c] for c in cols) for _, fields in lines]


def predict(run, rows: Sequence[tuple[str, ...]], *, batch_size: int = 32, progress: bool = True) -> list[dict]:
    """The saved run's predictions for `rows` (text_a[, text_b] each), in order."""
    config, model = run.config, run.model
    spec = glue_tasks.get_task(config.task)
    if any(len(r) != len(spec.hf_text) for r in rows):
        raise ValueError(f"{spec.name} takes {len(spec.hf_text)} text(s) per input ({', '.join(spec.hf_text)})")
    text_b = [r[1] for r in rows] if spec.is_pair else None
    labels = np.zeros(len(rows), np.float32 if spec.is_regression else np.int32)
    examples = glue_data.Examples(spec.name, "predict", [r[0] for r in rows], text_b, labels)
    encoded = pipeline.encode(examples, model.tokenizer, config.max_length)
    buckets = batching.bucket_lengths(config.length_buckets, config.max_length)
    apply = jax.jit(lambda p, b: model.module.apply({"params": p}, b["input_ids"], b["attention_mask"],
                                                    b.get("token_type_ids"), deterministic=True))  # fmt: skip
    out = np.zeros((len(rows), spec.num_labels), np.float32)
    batches = pipeline.eval_batches(encoded, batch_size=batch_size, buckets=buckets)
    total = batching.steps_per_epoch(encoded.lengths, buckets, batch_size)
    for batch in tqdm.tqdm(batches, total=total, unit="batch", disable=not progress or total < 4):
        logits = np.asarray(apply(run.merged, {k: v for k, v in batch.items() if k not in ("labels", "index")}))
        keep = batch["index"] >= 0
        out[batch["index"][keep]] = logits.reshape(len(keep), -1)[keep]
    if spec.is_regression:
        return [{"score": float(x[0])} for x in out]
    probs = np.exp(out - out.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [
        {"label": int(p.argmax()), "label_name": spec.label_names[int(p.argmax())], "probabilities": p.tolist()}
        for p in probs
    ]


def show_examples(workdir: str, summary: dict, n: int = 6) -> str:
    """A few dev sentences with the finished run's predicted and true labels, and the commands to try next."""
    run = saved_run.load(workdir, head=glue_train.head(saved_run.read_config(workdir), None))
    config = run.config
    spec = glue_tasks.get_task(config.task)
    split = next(iter(spec.dev_splits))
    dev = glue_data.load_task(config.task, split, data_dir=config.data_dir or None, source=config.data_source,
                              max_examples=n)  # fmt: skip
    rows = list(zip(dev.text_a, *([dev.text_b] if dev.text_b is not None else []), strict=True))
    lines = [f"{spec.name} {split}: {summary['metrics']} (best {summary['best']} at step {summary['best_step']});"
             f" {n} {split} examples with the {run.which} checkpoint (step {run.step}):"]  # fmt: skip
    for row, out, label in zip(rows, predict(run, rows, progress=False), dev.labels, strict=True):
        text = " / ".join(t.strip() for t in row)
        text = text if len(text) <= 80 else text[:77] + "..."
        if spec.is_regression:
            lines.append(f"  predicted {out['score']:5.2f}  true {float(label):5.2f}  {text}")
        else:
            true = spec.label_names[int(label)]
            p = out["probabilities"][out["label"]]
            lines.append(f"  predicted {out['label_name']:>13} ({p:.2f})  true {true:>13}  {text}")
    example = " ".join(f'--text{"_b" if i else ""} "{t}"' for i, t in enumerate(rows[0]))
    lines += [
        "next:",
        f"  python -m train.predict --workdir {workdir} {example}",
        f"  python -m train.export --workdir {workdir} --format peft --out {workdir}-peft",
        f"  python -m train.export --workdir {workdir} --format merged --out {workdir}-merged",
    ]
    return "\n".join(lines)
