"""The README's "Adding an architecture" snippets run as written."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxformers as jf

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets(section):
    text = README.read_text()
    body = text.split(f"### {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_adding_an_architecture_snippets_run():
    arch, loss = _snippets("Adding an architecture")
    ns = {}
    exec(compile(arch, "README:architecture", "exec"), ns)
    exec(compile(loss, "README:loss", "exec"), ns)
    config = ns["config"]
    module = jf.build(config)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, config.vocab_size)
    params = jf.init_params(module, jax.random.PRNGKey(1))
    logits = module.apply({"params": params}, tokens[:, :-1])
    assert logits.shape == (2, 8, config.vocab_size)
    # the mixer is causal: the first position's logits ignore later tokens
    other = module.apply({"params": params}, tokens[:, :-1].at[:, 1:].set(0))
    np.testing.assert_allclose(other[:, 0], logits[:, 0], atol=1e-6)
    from jaxformers.training import get_loss
    fn = get_loss("label_smoothed")
    value, metrics = fn(module, params, {"tokens": tokens}, None)
    assert np.isfinite(float(value)) and float(metrics["n_targets"]) == 16
    grads = jax.grad(lambda p: fn(module, p, {"tokens": tokens}, None)[0])(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
