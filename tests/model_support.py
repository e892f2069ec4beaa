"""Test models: random weights without a compile per shape (tests/test_infer.py, test_serve_model.py)."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import Transformer
from dsv3_jax.config import ModelConfig


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Parameters drawn with numpy into `nnx.eval_shape`'s structure (norms 1, gate bias 0):
    initialising through jax.random compiles one program per shape, tens of seconds on a busy CPU."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    for path, var in nnx.to_flat_state(state):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if len(path) > 1 and "norm" in str(path[-2]):
            value = np.ones(shape)
        elif path[-1] == "bias":  # the gate's balancing bias
            value = np.zeros(shape)
        else:
            value = cfg.init_std * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, state)
