"""Rows of an input file for train.predict / train.generate: JSONL objects or TSV fields, each with its line number
for errors; and `write_jsonl`, their atomic output.

Both readers raise ValueError naming `file:line` (a line that is not a JSON object, a TSV row shorter than its
header); what a row must hold is the job's to check (train/glue/predict.py, train/nlg/predict.py).
"""

import csv
import json
import os
from collections.abc import Iterator


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def jsonl_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i}: not a JSON object ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{i}: not a JSON object ({type(obj).__name__})")
            yield i, obj


def write_jsonl(path: str, objects) -> int:
    """Writes one JSON object per line to `path` atomically (a temporary file, then a rename); returns the count."""
    objects = list(objects)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(o) + "\n" for o in objects)
    os.replace(tmp, path)
    return len(objects)


def tsv_rows(path: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """(the header's column names, (line number, fields) of every row) of a tab-separated file."""
    with open(path, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = lines[0] if lines else []

    def rows():
        for i, fields in enumerate(lines[1:], 2):
            if len(fields) < len(header):
                raise ValueError(f"{path}:{i}: {len(fields)} fields, the header has {len(header)}")
            yield i, fields

    return header, rows()
