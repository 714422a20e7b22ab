"""Strict reader for the official GLUE .tsv files (the layout the GLUE download script writes).

GLUE files are tab-separated with NO quoting: a field may start with `"` (MRPC, RTE, STS-B) and must be kept
verbatim, so this reads raw lines and splits on tabs (csv.QUOTE_NONE semantics; pandas' default quoting
misreads them). Lines are split on "\\n" only, so line numbers in errors are the file's own. A UTF-8 byte-order
mark (MRPC) is dropped; the header must match `LocalFile.columns` exactly; every row must have exactly that
many columns, except the short rows QQP's official files are known to contain (see
`LocalFile.skip_short_rows`), which are dropped with a warning naming their lines. Trailing blank lines are
ignored; any other malformed row raises ValueError("path:line: expected ...").
"""

import math
import os
import warnings
from collections.abc import Iterator

import numpy as np

from train.glue.tasks import LocalFile, TaskSpec


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, text without its line ending); trailing blank lines are dropped."""
    blank_at = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 BOM (MRPC files)
            if not raw:
                blank_at = blank_at or lineno
                continue
            if blank_at is not None:
                raise ValueError(f"{path}:{blank_at}: unexpected blank line inside the file")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _parse_label(raw: str, spec: TaskSpec, where: str, column: str) -> float:
    """Class id (index into spec.local_labels) or, for regression, the float score."""
    if spec.is_regression:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{where}: column {column!r}: expected a finite number, got {raw!r}")
        return value
    if raw not in spec.local_labels:
        raise ValueError(f"{where}: column {column!r}: expected one of {list(spec.local_labels)}, got {raw!r}")
    return spec.local_labels.index(raw)


def read_tsv(path: str, layout: LocalFile, spec: TaskSpec) -> tuple[list[str], list[str] | None, np.ndarray]:
    """Reads one official GLUE file.

    Args:
      path: the .tsv file.
      layout: its expected layout (from `spec.files[split]`).
      spec: the task, for the label vocabulary.

    Returns:
      (text_a, text_b, labels): text lists of length n (text_b None for single-sentence tasks) and labels [n]:
      int32 class ids, float32 scores for STS-B; -1 (classification) or NaN (STS-B) when the file has no
      label column (test files).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: "path:line: ..." for a wrong header, a row with the wrong number of columns or a bad label.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GLUE file not found: {path}")
    n = len(layout.columns)
    col = {name: i for i, name in enumerate(layout.columns)}
    text_cols = [col[c] for c in layout.text]
    texts: list[list[str]] = [[] for _ in text_cols]
    labels: list[float] = []
    skipped: list[int] = []
    lines = _lines(path)
    if layout.has_header:
        lineno, header = next(lines, (1, ""))
        if tuple(header.split("\t")) != layout.columns:
            raise ValueError(
                f"{path}:{lineno}: expected the header {chr(9).join(layout.columns)!r}, got {header[:200]!r}"
            )
    for lineno, line in lines:
        fields = line.split("\t")
        if len(fields) != n:
            if layout.skip_short_rows and len(fields) < n:
                skipped.append(lineno)
                continue
            raise ValueError(
                f"{path}:{lineno}: expected {n} tab-separated columns ({', '.join(layout.columns)}), "
                f"found {len(fields)}"
            )
        for out, i in zip(texts, text_cols, strict=True):
            out.append(fields[i])
        if layout.label is not None:
            labels.append(_parse_label(fields[col[layout.label]], spec, f"{path}:{lineno}", layout.label))
    if skipped:
        warnings.warn(
            f"{path}: dropped {len(skipped)} rows with missing columns (lines {skipped[:10]}"
            f"{' ...' if len(skipped) > 10 else ''}), as the TFDS and HF datasets GLUE builders do",
            stacklevel=2,
        )
    count = len(texts[0])
    if spec.is_regression:
        label_array = np.asarray(labels if layout.label else [math.nan] * count, np.float32)
    else:
        label_array = np.asarray(labels if layout.label else [-1] * count, np.int32)
    return texts[0], (texts[1] if len(texts) > 1 else None), label_array
