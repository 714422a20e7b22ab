"""The JAX internals mt.apply's interpreter depends on (mtlora_jax/jax_api.py): on the installed JAX, every
primitive it has a rule for exists, and a traced equation of it carries every param the rule reads. A JAX
release that renames a primitive or a param fails here, naming the primitive, the version and the params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mtlora_jax import jax_api


@jax.custom_jvp
def _jvp_fn(x):
    return jnp.sin(x)


_jvp_fn.defjvp(lambda primals, tangents: (jnp.sin(primals[0]), jnp.cos(primals[0]) * tangents[0]))


@jax.custom_vjp
def _vjp_fn(x):
    return jnp.sin(x)


_vjp_fn.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (jnp.cos(x) * g,))

X = np.arange(12, dtype=np.float32).reshape(3, 4)
# primitive -> (function, args) whose jaxpr holds an equation of it
PROGRAMS = {
    "jit": (lambda x: jax.jit(jnp.sin)(x), (X,)),
    "custom_jvp_call": (_jvp_fn, (X,)),
    "custom_vjp_call": (_vjp_fn, (X,)),
    "remat": (jax.checkpoint(jnp.sin), (X,)),
    "scan": (lambda x: lax.scan(lambda c, r: (c + r, r), jnp.zeros(4), x)[0], (X,)),
    "convert_element_type": (lambda x: x.astype(jnp.int32), (X,)),
    "transpose": (lambda x: x.T, (X,)),
    "reshape": (lambda x: x.reshape(-1), (X,)),
    "copy": (lambda x: lax.copy_p.bind(x), (X,)),
    "slice": (lambda x: x[1:3], (X,)),
    "dynamic_slice": (lambda x, i: lax.dynamic_slice(x, (i, 0), (2, 4)), (X, 1)),
    "squeeze": (lambda x: jnp.squeeze(x[None]), (X,)),
    "dot_general": (lambda x: x @ x.T, (X,)),
    "conv_general_dilated": (lambda x: lax.conv(x[None, None], jnp.ones((1, 1, 2, 2)), (1, 1), "VALID"), (X,)),
    "gather": (lambda x, i: x[i], (X, np.array([0, 2]))),
}


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


@pytest.mark.parametrize("name", sorted(jax_api.PARAMS_READ))
def test_every_primitive_the_interpreter_reads_exists_with_its_params(name):
    prim = jax_api.primitive(name)  # raises ImportError naming the primitive and the JAX version
    if name not in PROGRAMS:
        pytest.skip(f"{name}: no public API emits it alone (closed_call); its existence is checked")
    fn, args = PROGRAMS[name]
    eqns = [e for e in _equations(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive is prim]
    assert eqns, f"JAX {jax.__version__}: tracing the {name} program emitted no {name} equation"
    missing = jax_api.missing_params(name, eqns[0])
    assert not missing, (
        f"JAX {jax.__version__}: primitive {name!r} no longer has params {missing} that mtlora_jax/apply.py or "
        f"factored.py reads (it has {sorted(eqns[0].params)}); update the rule and jax_api.PARAMS_READ"
    )


def test_an_unknown_primitive_fails_naming_it():
    with pytest.raises(ImportError, match=rf"JAX {jax.__version__} has no primitive 'frobnicate'"):
        jax_api.primitive("frobnicate")
