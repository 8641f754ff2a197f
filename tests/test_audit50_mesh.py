"""Audit 50 (mesh): every registered architecture trains the same on a mesh as on one device.

For one fixed batch, the loss, the global gradient norm and every gradient leaf of one train step
are compared between

* one device, no mesh: the pure :func:`jaxformers.training.train_step`, jitted as its docstring
  shows, and
* a mesh of 4 fake CPU devices: :class:`jaxformers.training.Program` (what the trainer runs: its
  parameter / optimizer-state / batch shardings, the step compiled under the logical axis
  rules), from the same parameters,

with the family's own loss (``default_loss``: landmark's inserts its landmarks) and an rng (the
dropout masks and cotformer's sampled capacities drawn on the mesh are one device's).  The XLA path
of a family and its Pallas kernel path (interpret mode on the CPU: flash attention, the sparse
attention kernels, landmark attention, the selective scan / SSD, the Hadamard kernel) both run:
on a mesh the kernels run per device on their block of rows and heads
(:func:`jaxformers.sharding.kernel_map`), where a wrong split (GQA heads split unevenly between q
and kv, a sequence split, a replicated output computed from a partial input) would give other
numbers without an error.

The gradients come out of the optimizer state: ``optax.chain(optax.trace(decay=0), scale(0))``
keeps the step's exact gradient in its state (sharded like the parameters) and leaves the
parameters as they are.  Float32, matmuls at highest precision: a loss within 1e-5 relative and
every gradient leaf within 1e-3 of its largest entry (measured: <= 4e-7 and <= 6e-5).

The fast test runs the kernel path of one family per :func:`kernel_map` call site (quarot:
flash attention with GQA and the Hadamard kernel; hash_sparse, landmark, mamba, mamba2) on
``fsdp=2,tensor=2`` (the batch split, the parameters split over embed and heads / MLP units, two
query heads and one kv head per device): ~45 s on one core.  The slow ones (``-m slow``) run
every registered family (its kernel path on ``data=2,tensor=2`` and ``fsdp=2,tensor=2``, its XLA
path on the latter), then harder configurations on ``expert=2,tensor=2`` (the expert axis as a
batch axis: no family has experts) and ``tensor=4`` (which 2 kv heads do not divide: the kernels
then see every head): 4 query heads per kv head per device, one kv head (MQA, whole on every
device), Mamba-2 groups split with their heads, QuaRot's online quantizers, a fused
layer-parallel llama pair, packed documents, scanned remat layers with gradient accumulation.
Rules that split the sequence are tests/test_audit40_shard.py's.

Found on the way: ``Program.init_from(p)`` handed back ``p``'s own buffers (one device, or a
replicated sharding), which the first train step donated: ``train(..., init_params=p)`` deleted
``p`` (:func:`test_init_from_copies_the_callers_params`).
"""
import textwrap

import pytest

from multidevice import REPO, run_on_devices

N_DEVICES = 4
SMALL = dict(vocab_size=64, d_model=32, n_layer=1, max_seq_len=32)
PER_FAMILY = {
    "llama": dict(n_head=4, n_kv_head=2, d_ff=64),
    "quarot": dict(n_head=4, n_kv_head=2, d_ff=64),
    "hybrid": dict(n_head=4, n_kv_head=2, d_ff=64, headdim=16, chunk_size=16, d_state=8, n_layer=2),
    "mamba": dict(d_state=8),
    "mamba2": dict(headdim=16, chunk_size=16, d_state=16),
    "landmark": dict(n_head=4, landmark_block=8, block_q=16),
    "hash_sparse": dict(n_head=4, n_kv_head=2, block_q=16, block_k=16),
    "qk_sparse": dict(n_head=4, n_kv_head=2, block_q=16, block_k=16),
    "adaptive_cotformer": dict(n_head=4, n_layer=3, n_repeat=2),  # begin, repeated and end layers; a router
    "layer_parallel": dict(n_head=4, n_layer=3, pair_start=1, pair_end=3),  # layer 0, then a pair
}
# the kernel path of each family (attention_impl="pallas" for the others that have attention)
KERNEL_KW = {"hash_sparse": dict(sparse_impl="pallas"), "qk_sparse": dict(sparse_impl="pallas"),
             "landmark": dict(landmark_impl="pallas"), "mamba": dict(scan_impl="pallas"),
             "mamba2": dict(scan_impl="pallas"), "hybrid": dict(scan_impl="pallas", attention_impl="pallas"),
             "quarot": dict(rotated=True, hadamard_impl="pallas", attention_impl="pallas")}
LOSS_RTOL, NORM_RTOL, GRAD_RTOL = 1e-5, 1e-4, 1e-3


def families():
    import jaxformers as jf
    return [n for n in jf.list_models() if not n.startswith(("test-", "audit"))]


def small_config(name, kernels=False, **overrides):
    """The family's tiny preset, shrunk further; ``kernels``: its Pallas path (else dropout on)."""
    import jaxformers as jf
    kw = dict(SMALL, **PER_FAMILY.get(name, dict(n_head=4)))
    kw.update(KERNEL_KW.get(name, dict(attention_impl="pallas")) if kernels else dict(dropout=0.1))
    kw.update(overrides)
    return jf.get_config(name, "tiny", **kw)


SCRIPT = textwrap.dedent('''
    import functools, json, sys, time
    sys.path.insert(0, {repo!r})
    import jax, numpy as np, optax
    assert jax.device_count() == {n}, jax.devices()
    import jaxformers as jf
    from jaxformers.training import Program, make_mesh, train_step
    from jaxformers.training.losses import get_loss
    from jaxformers.training.steps import compute_config
    from tests.test_audit50_mesh import small_config

    cases, meshes = {cases!r}, {meshes!r}
    tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
    # packed rows: two documents each, the boundary at a different place in every row
    segments = (np.arange(17)[None] >= np.arange(3, 11)[:, None]).astype(np.int32)
    tx = optax.chain(optax.trace(decay=0.0), optax.scale(0.0))  # the state keeps the gradient
    rng = jax.random.PRNGKey(3)

    def grads(opt):
        return jax.tree.map(np.asarray, opt[0].trace)

    out = {{}}
    for name, kernels, kw in cases:
        t0 = time.time()
        key = name + (":pallas" if kernels else "") + "".join(f" {{k}}={{v}}" for k, v in sorted(kw.items()))
        packed, accum = kw.pop("packed", False), kw.pop("grad_accum", 1)
        batch = dict(tokens=tokens, **(dict(segment_ids=segments) if packed else {{}}))
        try:  # one device, no mesh: the pure step function
            c = compute_config(small_config(name, kernels, **kw), "float32")
            module, loss_fn = jf.build(c), get_loss(type(c).default_loss)

            @jax.jit
            def init_and_step(key, batch):  # one program: the init's forward is dead code
                params = jf.init_params(module, key)
                return params, train_step(module, tx, loss_fn, params, tx.init(params), batch, 0, rng,
                                          grad_accum=accum)

            params, (_, opt, m) = init_and_step(jax.random.PRNGKey(0), batch)
            l0, n0, g0 = float(m["loss"]), float(m["grad_norm"]), grads(opt)
        except Exception as e:
            out[key] = {{"error": f"one device: {{type(e).__name__}}: {{e}}"[:2000]}}
            continue
        res = out[key] = {{"loss": l0, "grad_norm": n0}}
        for mesh in meshes:
            try:
                prog = Program(module, make_mesh(mesh), loss_fn=loss_fn, tx=tx, grad_accum=accum)
                p, o = prog.init_from(params)
                _, opt, m = prog.train_step(p, o, prog.put_batch(batch, 8), 0, rng)
                l1, n1, g1 = float(m["loss"]), float(m["grad_norm"]), grads(opt)
            except Exception as e:
                res[mesh] = {{"error": f"{{type(e).__name__}}: {{e}}"[:2000]}}
                continue
            leaves = jax.tree_util.tree_leaves_with_path(g0)
            rel = {{jax.tree_util.keystr(k): float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
                   for (k, a), b in zip(leaves, jax.tree.leaves(g1))}}  # of the leaf's largest entry
            worst = max(rel, key=rel.get)
            res[mesh] = {{"dloss": abs(l1 - l0) / abs(l0), "dnorm": abs(n1 - n0) / n0, "dgrad": rel[worst],
                         "worst": worst, "n_leaves": len(rel), "finite": bool(np.isfinite(l0) and n0 > 0)}}
        res["seconds"] = round(time.time() - t0, 1)
        last = module, loss_fn, params

    # Program.init_from copies: donating what it returns (as train_step does) leaves the caller's
    # arrays alive, also replicated over every device (was: deleted; "Array has been deleted" on
    # the next mesh)
    module, loss_fn, params = last
    p, _ = Program(module, make_mesh("data={n}"), loss_fn=loss_fn, tx=tx).init_from(params)
    jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(p)
    out = dict(cases=out, init_from_deleted=sum(a.is_deleted() for a in jax.tree.leaves(params)))
    print("RESULT" + json.dumps(out))
''')


def run_cases(cases, meshes, n=N_DEVICES):
    """``cases``: ``(family, kernels, config overrides)`` triples (``packed`` / ``grad_accum``: of
    the batch / the step); ``{case: {"loss", "grad_norm", mesh: differences or "error"}}``."""
    return run_on_devices(SCRIPT.format(repo=str(REPO), n=n, cases=list(cases), meshes=list(meshes)), n)


def check(out, meshes):
    """Every case ran on one device and on every mesh, and the differences are within tolerance;
    ``init_from`` left the one-device parameters alive."""
    bad = [] if out["init_from_deleted"] == 0 else \
        [f"Program.init_from: {out['init_from_deleted']} of the given arrays deleted by a donating step"]
    for key, res in out["cases"].items():
        print(key, {m: ({k: v for k, v in r.items() if k in ("dloss", "dnorm", "dgrad", "error")}
                        if isinstance(r, dict) else r) for m, r in res.items()})  # shown on failure / -s
        if "error" in res:
            bad.append(f"{key}: {res['error']}")
            continue
        for mesh in meshes:
            r = res[mesh]
            if "error" in r:
                bad.append(f"{key} on {mesh}: {r['error']}")
            elif not r["finite"] or r["dloss"] > LOSS_RTOL or r["dnorm"] > NORM_RTOL \
                    or r["dgrad"] > GRAD_RTOL:
                bad.append(f"{key} on {mesh}: loss {r['dloss']:.2e}, grad norm {r['dnorm']:.2e}, gradient "
                           f"{r['dgrad']:.2e} ({r['worst']}) relative differences "
                           f"(one device: loss {res['loss']})")
    assert not bad, "\n".join(bad)


# the fast test's representative subset: every kernel_map call site once (flash attention with GQA
# and the Hadamard kernel in quarot, the sparse kernels, landmark attention, both scans); the slow
# test runs every family
FAST = ("quarot", "hash_sparse", "landmark", "mamba", "mamba2")


def test_kernel_paths_train_the_same_on_a_mesh():
    """The kernel path of one family per kernel_map call site, on fsdp=2,tensor=2 (~45 s on one core)."""
    meshes = ["fsdp=2,tensor=2"]
    check(run_cases([(n, True, {}) for n in FAST], meshes), meshes)


HARD = [  # (family, kernels, overrides)
    ("llama", True, dict(n_head=8, n_kv_head=2)),  # tensor=2: 4 query heads, 1 kv head per device
    ("llama", True, dict(n_kv_head=1)),  # MQA: the kv head whole on every device
    ("hash_sparse", True, dict(n_head=8, n_kv_head=2)),
    ("mamba2", True, dict(n_groups=2)),  # B/C groups split with their heads
    ("quarot", True, dict(a_bits=8, a_groupsize=16, kv_bits=4)),  # online quantizers
    ("layer_parallel", True, dict(base_model="llama", n_kv_head=2, mlp="swiglu", d_ff=64, norm="rmsnorm")),
    ("gpt", True, dict(packed=True)), ("mamba2", True, dict(packed=True)),
    ("hash_sparse", True, dict(packed=True)),
    ("llama", True, dict(scan_layers=True, remat="full", grad_accum=2)),
    ("mamba2", True, dict(scan_layers=True, remat="full", grad_accum=2)),
]


@pytest.mark.slow
def test_every_architecture_and_path_trains_the_same_on_meshes():
    """Every registered family: its kernel path on two meshes, its XLA path (dropout on) on one
    (~4 min on one core)."""
    meshes = ["data=2,tensor=2", "fsdp=2,tensor=2"]
    check(run_cases([(n, True, {}) for n in families()], meshes), meshes)
    check(run_cases([(n, False, {}) for n in families()], meshes[1:]), meshes[1:])


@pytest.mark.slow
def test_harder_configurations_train_the_same_on_meshes():
    """GQA with several query heads per kv head on a device, MQA, Mamba-2 groups, QuaRot's
    quantizers, a fused layer-parallel pair, packed documents, scanned remat layers with gradient
    accumulation; on tensor=4 (which 2 kv heads do not divide) and with the expert axis as a batch
    axis (~3 min on one core)."""
    meshes = ["expert=2,tensor=2", "tensor=4"]
    check(run_cases(HARD, meshes), meshes)


def test_init_from_copies_the_callers_params():
    """``Program.init_from(p)`` returned ``p``'s own buffers when they were already placed as the
    shardings ask (one device), and the first train step (which donates its params) deleted them:
    ``train(..., init_params=p)`` left the caller "Array has been deleted" (found running the step
    of one set of parameters on several meshes, above)."""
    import jax
    import numpy as np
    import optax
    import jaxformers as jf
    from jaxformers.training import Program, make_mesh

    module = jf.build(small_config("gpt"))
    params = jf.init_params(module, jax.random.PRNGKey(0))
    before = jax.tree.map(np.array, params)
    prog = Program(module, make_mesh("data=1"), tx=optax.sgd(0.1))
    p, o = prog.init_from(params)
    prog.train_step(p, o, prog.put_batch({"tokens": np.ones((2, 9), np.int32)}, 2), 0, jax.random.PRNGKey(1))
    assert not any(a.is_deleted() for a in jax.tree.leaves(params))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), before)
