"""The one place where mtlora_jax touches JAX internals: jax.extend.core and the params of the primitives it reads.

`mt.apply` (apply.py, factored.py) evaluates jaxprs itself, so it depends on what a JAX release calls its
primitives and which params their equations carry. Both are declared here, in `PARAMS_READ`: primitive name ->
the eqn.params keys the interpreter's rule for it reads. tests/test_jax_api.py traces each primitive on the
installed JAX and fails naming the primitive, the JAX version and the missing params when a release changes
them; `primitive(name)` fails the same way at import.
"""

import jax
import jax.extend.core as jcore

Literal = jcore.Literal
# primitive (jax.extend.core.primitives.<name>_p) -> the eqn.params keys its rule in apply.py / factored.py reads
# (the other params are passed through unread)
PARAMS_READ = {
    "jit": ("jaxpr",),
    "closed_call": ("call_jaxpr",),
    "custom_jvp_call": ("call_jaxpr",),
    "custom_vjp_call": ("call_jaxpr",),
    "remat": ("jaxpr", "prevent_cse", "policy"),
    "scan": ("jaxpr", "num_consts", "num_carry", "length", "reverse", "unroll"),
    "convert_element_type": (),
    "transpose": ("permutation",),
    "reshape": ("new_sizes",),
    "copy": (),
    "slice": ("start_indices", "limit_indices", "strides"),
    "dynamic_slice": ("slice_sizes",),
    "squeeze": ("dimensions",),
    "dot_general": ("dimension_numbers",),
    "conv_general_dilated": ("dimension_numbers", "feature_group_count", "batch_group_count"),
    "gather": ("dimension_numbers", "slice_sizes"),
}


def primitive(name: str):
    """The JAX primitive `name` (e.g. "dot_general" -> jax.extend.core.primitives.dot_general_p)."""
    p = getattr(jcore.primitives, f"{name}_p", None)
    if p is None:
        raise ImportError(
            f"JAX {jax.__version__} has no primitive {name!r} (jax.extend.core.primitives.{name}_p): mtlora_jax's "
            "interpreter (mtlora_jax/apply.py, factored.py) needs updating for this JAX release"
        )
    return p


def missing_params(name: str, eqn) -> tuple[str, ...]:
    """The params of PARAMS_READ[name] that `eqn` (an equation of that primitive) lacks; empty when all are there."""
    return tuple(k for k in PARAMS_READ[name] if k not in eqn.params)
