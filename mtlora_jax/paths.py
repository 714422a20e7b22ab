"""Parameter paths as "/"-joined strings, and regex matching over them.

A Flax parameter tree `{"encoder": {"layer_0": {"query": {"kernel": w}}}}` has the leaf path
"encoder/layer_0/query/kernel". Fields of an `Adapted` node extend it: ".../kernel/a". Every pattern in
the library is matched against such strings with `re.fullmatch`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import jax

from mtlora_jax.adapted import is_adapted
from mtlora_jax.quantized import is_quantized


def path_str(keypath: Sequence) -> str:
    """Joins a jax key path (dict keys, attributes, sequence indices) with "/"."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def named_leaves(tree, *, adapted_as_leaf: bool = True) -> list[tuple[str, object]]:
    """(path, leaf) pairs in tree order; `Adapted` and `Quantized` nodes are single leaves unless
    adapted_as_leaf=False."""
    is_leaf = (lambda x: is_adapted(x) or is_quantized(x)) if adapted_as_leaf else None
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat]


def compile_patterns(patterns: Iterable[str], what: str) -> tuple[re.Pattern, ...]:
    """Compiles regexes, raising ValueError that names `what` and the bad pattern."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{what}: patterns must be regex strings, got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what}: invalid regex {p!r}: {e}") from None
    return tuple(out)


def first_match(patterns: Sequence[tuple[str, object]], path: str, default=None):
    """The value of the first (regex, value) pair whose regex full-matches `path`, else `default`."""
    for pattern, value in patterns:
        if re.fullmatch(pattern, path):
            return value
    return default


def matches_any(patterns: Iterable[re.Pattern], path: str) -> bool:
    """Whether any compiled pattern full-matches `path`."""
    return any(p.fullmatch(path) for p in patterns)


def check_all_used(patterns: Iterable[re.Pattern], paths: Sequence[str], what: str) -> None:
    """Raises ValueError for a pattern that matches none of `paths`, listing a few paths as a hint."""
    for p in patterns:
        if not any(p.fullmatch(path) for path in paths):
            sample = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise ValueError(f"{what} pattern {p.pattern!r} matches no parameter path (paths look like: {sample})")
