"""Instruction-tuning rows from a JSONL file, a JSON array or a folder of them, each in one of four formats.

  chat        {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]} (optionally a
              top-level "system": str, put first as a system turn); needs at least one assistant turn
  prompt      {"prompt": str, "completion": str}
  alpaca      {"instruction": str, "input": str (optional), "output": str}
  text        {"text": str}

Other keys (an "id", Alpaca Libre's "status" and "other") are ignored. The format is detected once per file,
from its first valid row; a row of another shape is an error naming `file:line` and the keys it has. With
`skip_bad_rows`, invalid rows (not JSON, another shape, empty fields) are skipped and counted instead; without it
the error counts every invalid row by cause and names the first of each. An empty file, or one with no valid
row, is always an error.

Every row becomes a `Row`: its messages (chat and alpaca, alpaca as one user turn `instruction\\n\\ninput`
and one assistant turn, both stripped of surrounding whitespace) or its prompt and completion (prompt; text
rows have an empty prompt and train on every token). train/sft/tokens.py turns rows into token ids and loss
masks.
"""

import json
import os
import pathlib
from typing import NamedTuple

FORMATS = ("chat", "prompt", "alpaca", "text")
ROLES = ("system", "user", "assistant")
# format -> the keys that identify it (a row with all of them is of that format)
_KEYS = {"chat": ("messages",), "prompt": ("prompt", "completion"), "alpaca": ("instruction", "output"),
         "text": ("text",)}  # fmt: skip
EXTENSIONS = (".jsonl", ".json")


class Row(NamedTuple):
    """One training example: `messages` (chat, alpaca) or `prompt` + `completion` (prompt, text).

    Attributes:
      messages: ((role, content), ...) or None.
      prompt, completion: strings (None for chat and alpaca rows); a text row has prompt "" and its text as
        completion (the loss covers every token).
      where: "file:line" for messages about this row.
      fmt: the row's format (one of FORMATS).
    """

    messages: tuple | None
    prompt: str | None
    completion: str | None
    where: str
    fmt: str


class Loaded(NamedTuple):
    """The rows of a file or folder, the format of each file, and the rows skipped per cause."""

    rows: list[Row]
    formats: dict[str, str]
    skipped: dict[str, int]


class RowError(ValueError):
    """A row that does not hold what its file's format needs; the message starts with file:line.

    `cause` groups the errors of a file: "not valid JSON", "of another format", "with an empty field",
    "with a bad field"."""

    def __init__(self, message: str, cause: str = "with a bad field"):
        super().__init__(message)
        self.cause = cause


def detect(obj) -> str | None:
    """The format of one parsed row (the first of FORMATS whose keys it has), or None."""
    if not isinstance(obj, dict):
        return None
    return next((f for f in FORMATS if all(k in obj for k in _KEYS[f])), None)


def _text(obj: dict, key: str, where: str, *, empty_ok: bool = False) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise RowError(f"{where}: {key!r} is a {type(value).__name__}, expected a string")
    if not empty_ok and not value.strip():
        raise RowError(f"{where}: {key!r} is empty", "with an empty field")
    return value


def _messages(obj: dict, where: str) -> tuple:
    turns = obj["messages"]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = [("system", _text(obj, "system", where))] if "system" in obj else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise RowError(f"{where}: messages[{i}] is {json.dumps(turn)[:80]}; expected {{'role': one of "
                           f"{', '.join(ROLES)}, 'content': str}}")  # fmt: skip
        out.append((turn["role"], turn["content"]))
    if not any(role == "assistant" for role, _ in out):
        raise RowError(
            f"{where}: a chat without an assistant turn (roles: {', '.join(r for r, _ in out)})",
            "without an assistant turn",
        )
    return tuple(out)


def parse(obj, fmt: str, where: str) -> Row:
    """The Row of one parsed JSON value in format `fmt`; raises RowError naming `where` and the cause."""
    found = detect(obj)
    if found != fmt:
        keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise RowError(f"{where}: not a {fmt} row like the file's first ({fmt} needs {', '.join(_KEYS[fmt])}); "
                       f"it has: {keys or 'nothing'}", "of another format")  # fmt: skip
    if fmt == "chat":
        return Row(_messages(obj, where), None, None, where, fmt)
    if fmt == "alpaca":
        extra = _text(obj, "input", where, empty_ok=True).strip()
        instruction = _text(obj, "instruction", where).strip()
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Row((("user", user), ("assistant", _text(obj, "output", where).strip())), None, None, where, fmt)
    if fmt == "prompt":
        return Row(None, _text(obj, "prompt", where), _text(obj, "completion", where), where, fmt)
    return Row(None, "", _text(obj, "text", where), where, fmt)


def _values(path: pathlib.Path):
    """(line number, parsed value or the JSON error) of every row of a JSONL file or JSON array."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            values = json.loads(text)
        except ValueError as e:
            raise RowError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return [(i, v) for i, v in enumerate(values, 1)]  # a JSON array: "line" is the row's position
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except ValueError as e:
                out.append((n, RowError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})", "not valid JSON")))
    return out


def read_file(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> tuple[list[Row], str, dict[str, int]]:
    """(rows, format, skipped rows per cause) of one file; raises RowError on an empty file or a bad row."""
    path = pathlib.Path(path)
    values = _values(path)
    if not values:
        raise RowError(f"{path}: empty file (no rows)")
    fmt = next((detect(v) for _, v in values if detect(v)), None)
    if fmt is None:
        n, first = values[0]
        if isinstance(first, RowError):
            raise first
        keys = ", ".join(first) if isinstance(first, dict) else type(first).__name__
        known = "; ".join(f"{f}: " + ", ".join(k) for f, k in _KEYS.items())
        raise RowError(f"{path}:{n}: no row in a known format ({known}); it has: {keys or 'nothing'}")
    rows, bad = [], {}  # cause -> (count, the first error)
    for n, value in values:
        try:
            if isinstance(value, RowError):
                raise value
            rows.append(parse(value, fmt, f"{path}:{n}"))
        except RowError as e:
            count, first = bad.get(e.cause, (0, e))
            bad[e.cause] = (count + 1, first)
    skipped = {cause: count for cause, (count, _) in bad.items()}
    if bad and not skip_bad_rows:
        causes = "; ".join(f"{count} {cause} (first: {first})" for cause, (count, first) in bad.items())
        n = sum(skipped.values())
        raise RowError(f"{path}: {n} invalid row{'s' if n > 1 else ''}: {causes}; --config.skip_bad_rows=True "
                       f"skips {'them' if n > 1 else 'it'}")  # fmt: skip
    if not rows:
        raise RowError(f"{path}: no valid row (skipped: {skipped})")
    return rows, fmt, skipped


def files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The data files of `path`: the file itself, or the .jsonl / .json files of a folder (sorted)."""
    path = pathlib.Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in EXTENSIONS and p.is_file())
        if not found:
            raise FileNotFoundError(f"{path}: a folder without .jsonl or .json files")
        return found
    raise FileNotFoundError(f"{path}: no such file or folder")


def load(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> Loaded:
    """Every row of a file or folder (files in name order); the format of each file; skipped rows per cause."""
    rows, formats, skipped = [], {}, {}
    for file in files(path):
        got, fmt, skip = read_file(file, skip_bad_rows=skip_bad_rows)
        rows += got
        formats[str(file)] = fmt
        for cause, n in skip.items():
            skipped[cause] = skipped.get(cause, 0) + n
    return Loaded(rows, formats, skipped)
