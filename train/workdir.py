"""One run per workdir: a lock held for the whole run, and a fingerprint that a resumed run must match.

`<workdir>/run.lock` holds {"host", "pid", "started"} of the run that owns the folder; it is created atomically
(O_CREAT | O_EXCL), so a second run on the same workdir refuses at once, naming the holder. A lock left by a
process of this host that no longer exists is taken over with a warning. A lock from another host cannot be
checked from here: that run refuses, and the message says which file to remove if that process is gone.

`<workdir>/fingerprint.json` records, at the first start, what makes the run this run: the identity keys of its
config (task, model, data, structure, rank, alpha, targets, head, seed, ...) and the identity of its training
data. A rerun whose config differs in any of them refuses with one line naming each differing key and both
values, before it touches the workdir; the other keys (steps, cadence, logging, mesh, decoding) may change on
resume, and each run's changes are appended to `<workdir>/resumes.jsonl`.
"""

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import socket

import numpy as np
from absl import logging

LOCK_FILE, FINGERPRINT_FILE, RESUMES_FILE = "run.lock", "fingerprint.json", "resumes.jsonl"
# Config keys that make a run what it is (those a job's config has): a resumed run must keep them.
IDENTITY_KEYS = (
    "task", "model", "max_train_examples", "train_subset", "max_length", "seed", "dtype", "base_dtype", "base_quant",
    "init_from",
    "scan_layers", "grad_accum_steps", "batch_size", "length_buckets", "batching", "pad_multiple", "packing",
    "label_smoothing", "learning_rate", "warmup_steps", "warmup_ratio", "weight_decay", "mtlora.structure",
    "mtlora.c_init", "mtlora.rank", "mtlora.alpha", "mtlora.dropout", "mtlora.targets_preset", "mtlora.extra_targets",
    "mtlora.extra_trainable", "holdout_examples", "holdout_seed",
)  # fmt: skip


# The value an identity key had in every run recorded before the key existed: such a workdir is compared on it.
LEGACY_IDENTITY = {
    "batching": "buckets", "mtlora.c_init": "kaiming_uniform", "holdout_examples": 0, "holdout_seed": 0,
}  # fmt: skip


class WorkdirInUse(OSError):
    """Another run holds the workdir (an input error: pick another --workdir)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _try_create(path: str, holder: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
    return True


@contextlib.contextmanager
def lock(workdir: str):
    """Holds `<workdir>/run.lock` for the `with` block; raises WorkdirInUse (one line) when another run holds it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    for _ in range(3):  # a stale lock is removed and the create retried; a race with another taker can lose
        if _try_create(path, me):
            break
        holder = _read_json(path) or {}
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            logging.warning("%s: taking over the stale lock of process %d (started %s), which has ended", path,
                            holder["pid"], holder.get("started", "?"))  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
        raise WorkdirInUse(
            f"workdir {workdir} is in use by {who} ({path}); wait for it, use another --workdir, or remove the "
            "lock file if that process is gone"
        )
    else:
        raise WorkdirInUse(f"workdir {workdir}: could not take {path} (another run took it first)")
    try:
        yield path
    finally:
        if (_read_json(path) or {}).get("pid") == me["pid"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node.to_dict() if hasattr(node, "to_dict") else node


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _update(h, obj) -> None:
    """Feeds a canonical byte form of `obj` (arrays, strings, numbers, containers, dataclasses) to hash `h`."""
    if isinstance(obj, np.ndarray):
        h.update(f"nd{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, str | bytes):
        h.update(f"s{len(obj)}:".encode())
        h.update(obj.encode() if isinstance(obj, str) else obj)
    elif dataclasses.is_dataclass(obj):
        _update(h, [getattr(obj, f.name) for f in dataclasses.fields(obj)])
    elif isinstance(obj, dict):
        _update(h, sorted(obj.items(), key=lambda kv: str(kv[0])))
    elif isinstance(obj, list | tuple | frozenset | set):
        items = sorted(obj, key=str) if isinstance(obj, frozenset | set) else obj
        h.update(f"l{len(items)}(".encode())
        for x in items:
            _update(h, x)
        h.update(b")")
    else:
        h.update(f"v{obj!r};".encode())


def digest(obj) -> str:
    """sha256 of `obj`'s canonical byte form: the identity of a job's training data."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def _normalized(key: str, value):
    """Local paths as absolute paths, so `./model` and its absolute form are the same run."""
    if key in ("model", "init_from") and isinstance(value, str) and value and os.path.exists(value):
        return os.path.abspath(os.path.expanduser(value))
    return _jsonable(value)


def fingerprint(config, data_id: str) -> dict:
    """The identity of a run: its config's IDENTITY_KEYS (those it has) and `data_id` (its training data)."""
    keys = {k: _normalized(k, _get(config, k)) for k in IDENTITY_KEYS if _get(config, k) is not None}
    return {**keys, "data_identity": data_id}


def check_fingerprint(workdir: str, config, data_id: str) -> dict:
    """Compares this run with the workdir's first run; raises ValueError naming every differing key.

    A workdir without fingerprint.json but with an earlier config.json (a run from before fingerprints) is
    compared on the keys config.json holds. Returns this run's fingerprint (written by `record_start`).
    """
    mine = fingerprint(config, data_id)
    saved = _read_json(os.path.join(workdir, FINGERPRINT_FILE))
    if saved is None and os.path.isfile(os.path.join(workdir, "config.json")):
        old = _read_json(os.path.join(workdir, "config.json")) or {}
        saved = {k: _normalized(k, _get(old, k)) for k in IDENTITY_KEYS if _get(old, k) is not None}
    if saved:
        saved = {**{k: v for k, v in LEGACY_IDENTITY.items() if k in mine}, **saved}
        diff = [k for k in mine if k in saved and saved[k] != mine[k]]
        if diff:
            said = "; ".join(f"config.{k}: {saved[k]!r} in the workdir, {mine[k]!r} now" for k in diff)
            said = said.replace("config.data_identity", "the training data")
            raise ValueError(
                f"workdir {workdir} holds another run ({said}); resume it with its own settings or use a new --workdir"
            )
    return mine


def record_start(workdir: str, config, mine: dict) -> None:
    """Writes fingerprint.json (first start), config.json, and one line per start to resumes.jsonl."""
    path = os.path.join(workdir, FINGERPRINT_FILE)
    first = not os.path.isfile(path)
    if first:
        _write_atomic(path, json.dumps(mine, indent=2))
    previous = _read_json(os.path.join(workdir, "config.json"))
    _write_atomic(os.path.join(workdir, "config.json"), config.to_json(indent=2))
    changed = {}
    if previous:
        now = json.loads(config.to_json())
        changed = {k: [previous.get(k), v] for k, v in now.items() if previous.get(k) != v}
    with open(os.path.join(workdir, RESUMES_FILE), "a") as f:
        f.write(json.dumps({"started": _now(), "first": first, "changed": changed}) + "\n")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
