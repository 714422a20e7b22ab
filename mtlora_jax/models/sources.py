"""Where a checkpoint comes from: a local HF folder, a ``.gguf`` file, or a Hugging Face hub id.

Local paths are tried first; a hub id is only fetched (with ``huggingface_hub``) when the machine is
online. With ``HF_HUB_OFFLINE=1`` and no cached copy, :func:`resolve` fails at once with a message
saying how to pass a local path, instead of retrying the network for minutes.

Safetensors are read with ``safetensors.safe_open`` into host numpy arrays (bfloat16 through
``ml_dtypes``); no torch is needed. Sharded checkpoints are read through their
``model.safetensors.index.json``.
"""

import json
import os
import pathlib
import re

import jax
import numpy as np

from mtlora_jax.models import file_checks

# Files a model folder needs from the hub: config, weights, tokenizer.
HUB_PATTERNS = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "*.model",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_LOCAL_HINT = "pass a local HF folder (config.json + model.safetensors) or a .gguf file path instead"


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _download(repo_id: str, gguf_file: str | None) -> pathlib.Path:
    """Fetches (or finds in the local hub cache) a hub repo and returns its folder."""
    import huggingface_hub as hub

    patterns = list(HUB_PATTERNS) + ([gguf_file] if gguf_file else [])
    offline = _offline()
    try:
        return pathlib.Path(hub.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same actionable message
        why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else f"{type(e).__name__}: {e}"
        raise OSError(
            f"{repo_id!r} is not a local path and could not be fetched from the hub ({why}); {_LOCAL_HINT}"
        ) from e


def resolve(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, pathlib.Path]:
    """Finds the checkpoint named by a path or hub id.

    Args:
      name_or_path: a folder with config.json, a folder with one .gguf file, a .gguf file, or a hub id.
      gguf_file: the .gguf file name inside a folder or hub repo holding several.

    Returns:
      ("hf", folder) or ("gguf", file).
    """
    path = pathlib.Path(name_or_path).expanduser()
    if not path.exists():
        if not _HUB_ID.fullmatch(str(name_or_path)) or str(name_or_path).startswith((".", "~")):
            raise FileNotFoundError(f"no such checkpoint path: {path}")
        path = _download(str(name_or_path), gguf_file)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not .gguf; pass the folder holding config.json instead")
        return "gguf", path
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in {path}")
        return "gguf", path / gguf_file
    if (path / "config.json").is_file():
        return "hf", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise FileNotFoundError(f"{path} has no config.json and {len(ggufs)} .gguf files; pass gguf_file= or a folder")


def read_safetensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a HF folder: ``model.safetensors`` or the shards of its index.

    Returns:
      {tensor name: host array in the stored dtype (torch layout, e.g. Linear [d_out, d_in])}.
    """
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    tensors = {}
    cpu = jax.local_devices(backend="cpu")[0]  # this process's own CPU (multi-process runs)
    for name in files:
        file_checks.check_safetensors(folder / name)  # the header fits in the file, before anything is read
        # framework="flax" reads every dtype incl. bfloat16 (the numpy API rejects it); kept on the CPU.
        with jax.default_device(cpu), safe_open(folder / name, framework="flax") as f:
            tensors.update({k: np.asarray(f.get_tensor(k)) for k in f.keys()})
    return tensors
