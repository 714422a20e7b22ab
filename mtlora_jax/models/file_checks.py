"""Header checks of model files before a reader allocates anything: what a header claims must fit in the file.

A GGUF or safetensors header states counts and lengths (strings, arrays, tensors) that a reader allocates
before it reads them; a damaged or hostile file can claim 2^40 entries in a few bytes. These checks walk the
header with the file's size as the bound and raise ValueError naming the file, the field and the claim.

GGUF (llama.cpp, v2 and v3): magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata count; each
metadata entry is a string key, a uint32 value type and the value (strings: uint64 length + bytes; arrays: uint32
element type + uint64 count + elements); each tensor info is a string name, uint32 n_dims, n_dims uint64 dims,
uint32 type and uint64 offset into the data section. Safetensors: uint64 header length + a JSON header of
{name: {"dtype", "shape", "data_offsets": [begin, end]}} into the bytes that follow.
"""

import json
import mmap
import os
import pathlib
import struct

# GGUF metadata value types: 0-7, 10-12 fixed size (bytes); 8 string; 9 array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8


class _Cursor:
    """Reads little-endian fields of `data`, refusing any read past its end."""

    def __init__(self, path: pathlib.Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(
                f"{self.path}: {what} claims {n:,} bytes at offset {self.pos:,}, past the end of the "
                f"{len(self.data):,}-byte file (a truncated or damaged GGUF)"
            )

    def take(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.take("Q", what)
        self.need(n, what)
        self.pos += n
        return bytes(self.data[self.pos - n : self.pos]).decode("utf-8", "replace")

    def value(self, vtype: int, what: str) -> None:
        if vtype in _FIXED:
            self.need(_FIXED[vtype], what)
            self.pos += _FIXED[vtype]
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY:
            etype, count = self.take("I", what), self.take("Q", what)
            if etype in _FIXED:
                self.need(count * _FIXED[etype], f"{what} ({count:,} entries)")
                self.pos += count * _FIXED[etype]
            elif etype in (_STRING, _ARRAY):
                self.need(count * 8, f"{what} ({count:,} entries)")  # every entry has at least a uint64 length
                for _ in range(count):
                    self.value(etype, what)
            else:
                raise ValueError(f"{self.path}: {what} has unknown array element type {etype}")
        else:
            raise ValueError(f"{self.path}: {what} has unknown value type {vtype}")


def check_gguf(path: str | os.PathLike) -> None:
    """Walks a GGUF header; raises ValueError (naming the file and field) on any claim the file cannot hold."""
    path = pathlib.Path(path)
    if path.stat().st_size < 24:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, too short for a GGUF header (a truncated file)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _walk_gguf(path, data)


def _walk_gguf(path: pathlib.Path, data) -> None:
    c = _Cursor(path, data)
    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {bytes(data[:4])!r})")
    c.pos = 4
    version = c.take("I", "the version")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = c.take("Q", "the tensor count"), c.take("Q", "the metadata count")
    c.need(n_kv * 12, f"the metadata count {n_kv:,}")  # a key length and a type at least
    for i in range(n_kv):
        key = c.string(f"metadata key {i}")
        c.value(c.take("I", f"metadata {key!r}"), f"metadata {key!r}")
    c.need(n_tensors * 24, f"the tensor count {n_tensors:,}")  # a name length, n_dims, type, offset at least
    for i in range(n_tensors):
        name = c.string(f"tensor {i}'s name")
        n_dims = c.take("I", f"tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"{path}: tensor {name!r} claims {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = [c.take("Q", f"tensor {name!r}") for _ in range(n_dims)]
        c.take("I", f"tensor {name!r}")
        offset = c.take("Q", f"tensor {name!r}")
        if offset > len(data):
            raise ValueError(f"{path}: tensor {name!r} {dims} starts at {offset:,}, past the end of the file")


def check_safetensors(path: str | os.PathLike) -> None:
    """Checks a safetensors header against the file's size; raises ValueError naming the file and tensor."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors header (a truncated file)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: header claims {n:,} bytes but the file has {size:,} (a truncated file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: the safetensors header is not JSON ({e})") from None
    available = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = (info.get("data_offsets") or [0, 0])[1]
        if end > available:
            raise ValueError(
                f"{path}: tensor {name!r} ends at byte {end:,} of a {available:,}-byte data section (a truncated file)"
            )
