"""README "Features" table claims that had no test of their own."""
import jax
import jax.numpy as jnp
import numpy as np

import jaxformers as jf


def test_gpt_packed_documents_have_the_logits_and_grads_of_each_document_alone():
    """Packed training: `segment_ids` make a packed row of gpt give each document's logits and
    the gradient (w.r.t. every parameter) of the summed per-document losses it has alone."""
    cfg = jf.get_config("gpt", "tiny", n_layer=2, d_model=32, n_head=2, vocab_size=64)
    m = jf.build(cfg)
    params = jf.init_params(m, jax.random.PRNGKey(0))
    lens = [5, 3, 8]
    tok = jax.random.randint(jax.random.PRNGKey(1), (1, sum(lens)), 0, 64)
    ct = jax.random.normal(jax.random.PRNGKey(2), (1, sum(lens), 64))
    seg = jnp.asarray([sum(([7 * (i + 1)] * n for i, n in enumerate(lens)), [])])

    def packed(p):
        out = m.apply({"params": p}, tok, segment_ids=seg)
        return jnp.sum(out * ct), out

    def separate(p):
        total, outs, s = 0.0, [], 0
        for n in lens:
            out = m.apply({"params": p}, tok[:, s:s + n])
            total, s = total + jnp.sum(out * ct[:, s:s + n]), s + n
            outs.append(out)
        return total, jnp.concatenate(outs, axis=1)

    (lp, op), gp = jax.value_and_grad(packed, has_aux=True)(params)
    (ls, os_), gs = jax.value_and_grad(separate, has_aux=True)(params)
    np.testing.assert_allclose(op, os_, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gs)):
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, float(jnp.abs(b).max())), rtol=1e-4)
    # without segment_ids the documents see each other: the gradients differ
    g_mixed = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, tok) * ct))(params)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_mixed), jax.tree.leaves(gs))) > 1e-4


def test_every_remat_policy_gives_the_gradients_of_no_remat():
    """`remat` policies (scanned and unrolled layers): same loss and gradients as remat="none"."""
    tok = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, 64)
    for scan in (False, True):
        base = jf.get_config("llama", "tiny", n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64,
                             vocab_size=64, scan_layers=scan)
        params = jf.init_params(jf.build(base), jax.random.PRNGKey(0))

        def grads(cfg):
            m = jf.build(cfg)
            return jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, tok) ** 2)))(params)

        ref_l, ref_g = grads(base)
        for policy in ("full", "dots", "dots_no_batch", "save_attention_out"):
            loss, g = grads(base.replace(remat=policy))
            np.testing.assert_allclose(loss, ref_l, rtol=1e-6)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
                np.testing.assert_allclose(a, b, atol=1e-6 * max(1.0, float(jnp.abs(b).max())), rtol=1e-5,
                                           err_msg=f"{policy} scan={scan}")
