"""QuaRot: perplexity of a Llama under weight / activation / KV-cache quantization, with and
without the rotations, and the activation outliers the rotations remove.

    python -m experiments.quarot --preset tiny --out runs/quarot-tiny  # trains a tiny llama, ~4 CPU min
    python -m experiments.quarot --preset gpu --out runs/quarot-gpu    # llama "small" width, d 768, 12 layers
    python -m experiments.quarot --run RUN_DIR --out DIR               # a llama run, or an HF Llama/Mistral/Qwen2/Qwen3 dir

A run trained here is evaluated on its own data and tokenizer (``--data`` overrides the data; a
scanned run is unrolled).  An HF Llama / Mistral / Qwen2 / Qwen3 dir needs ``--data`` (a corpus, tokenized with
``--tokenizer``, default the checkpoint's ``tokenizer.json``, or a dataset directory prepared
with that tokenizer); data whose vocabulary exceeds the model's is a usage error.

Without ``--run`` the preset's ``llama`` is trained first (``jaxformers.training.train``,
byte tokens of the built-in corpus or a prepared ``--data``'s tokens, seed ``--seed``;
``--reuse`` keeps the one an earlier invocation trained into ``OUT/runs/llama`` when its settings match).  Each scheme of :data:`SCHEMES` goes
through :func:`jaxformers.quant.quantize` and is evaluated on the validation split (the same
batches for all): ``W{w}A{a}KV{kv}``, RTN or GPTQ (calibrated on ``--calib`` sequences of the
training split), ``rot`` = with QuaRot's rotations.  Activations: symmetric per token, clip
0.9 at 4 bits (the paper's); KV: asymmetric per head, clip 0.95 at 4 bits; weights:
symmetric per output channel with a clipping search.  ``fp`` is the unquantized model (in the
run's compute dtype: float32 on CPU, bf16 on GPU), ``fp_rot`` the rotated one (must match:
``fp_rot_vs_fp`` in results.json records their perplexities, relative difference and whether it
is within :data:`ROTATION_TOLERANCE`, printed with a warning when it is not; ``null`` unless
both schemes ran).

Outliers: for the input of every linear (``attn_in`` = q/k/v, ``o_in``, ``mlp_in`` =
gate/up, ``down_in``) the per-channel max |x| over the tokens of the first
``OUTLIER_SEQUENCES`` calibration sequences (``outlier_sequences``), in float32, and its
max / median over channels, before vs after rotation.  ``int8_linear``: the real W8A8 path
(int8 x int8 -> int32) vs a dense matmul in the compute dtype: time, weight bytes (and int4
packed bytes), max difference to fake quantization.

Integer path (``int_path``, measured first): the model with integer weight storage
(``QuantSpec(storage="int")``: int8 or packed-int4 block linears, per-token int8
activations, int8 x int8 -> int32 matmuls; ``W4A16`` dequantizes: weight-only) vs the same
quantized weights in the fake-quant float model: forward time of one batch of the eval shape
(the first calibration windows, from the training split) in the compute dtype, the max logit
difference (relative to max |logit|), the fraction of token positions off by more than 1e-4
of it (float rounding can flip an activation code at a rounding boundary, and a flip
propagates to later tokens), both models' next-token loss on that batch, and the bytes of
the block linears stored as float32 / bf16 / int8 / packed int4 (+ float32 scales).
Rotated, RTN without clipping search, KV16; ``--int-schemes`` picks the rows (``none``: skip).

Writes ``OUT/results.json`` (rewritten after the integer path and after every scheme with
``"complete": false``; ``true`` once the outliers and the int8 table are in),
``OUT/quarot_ppl.png`` (perplexity per scheme), ``OUT/quarot_outliers.png`` (outlier ratio per
linear input, channel max |x| profiles) and ``OUT/quarot_int.png`` (weight bytes, integer vs
fake-quant forward time).
``--steps`` / ``--eval-batches`` / ``--calib`` / ``--only`` / ``--seq-len`` / ``--batch-size``
/ ``--int-schemes`` shrink a run (tests).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from experiments.common import (check_data_vocab, check_reuse, check_run_args, experiment_parser, median_ms,
                                parse_experiment_args, parse_list, reuse_or_train, run_kind, save_progress,
                                start_results, train_overrides, unrolled, usage_error, write_json)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("quarot_ppl.png", "quarot_outliers.png", "quarot_int.png")

PRESETS = {
    "tiny": dict(model=dict(preset="tiny", max_seq_len=128),
                 train=dict(steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30,
                            eval_every=0, eval_batches=16), calib=128, calib_batch=32,
                 linear_shapes=((512, 128, 352), (512, 352, 128))),
    # llama "small" (d 768, 12 layers, 12 heads / 4 kv heads, d_ff 2048 = H_12-free 2^11;
    # d 768 = 12 * 64 needs the Paley factor 12) on bytes
    "gpu": dict(model=dict(preset="small", max_seq_len=512),
                train=dict(steps=2000, batch_size=32, seq_len=512, lr=1e-3, warmup_steps=200,
                           eval_every=0, eval_batches=40, dtype="bfloat16"), calib=256, calib_batch=32,
                linear_shapes=((8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096),
                               (8192, 8192, 8192))),
}

# integer-path rows: name -> (w_bits, a_bits)
INT_SCHEMES = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W4A16": (4, 16)}

# name -> QuantSpec fields (a_clip / kv_clip set from the bit widths in _spec)
SCHEMES = {
    "fp": dict(rotate=False),
    "fp_rot": dict(rotate=True),
    "W4A16_RTN": dict(rotate=False, w_bits=4),
    "W4A16_RTN_rot": dict(rotate=True, w_bits=4),
    "W4A16_GPTQ": dict(rotate=False, w_bits=4, w_method="gptq"),
    "W4A16_GPTQ_rot": dict(rotate=True, w_bits=4, w_method="gptq"),
    "W4A4KV4_RTN": dict(rotate=False, w_bits=4, a_bits=4, kv_bits=4),
    "W4A4KV4_RTN_rot": dict(rotate=True, w_bits=4, a_bits=4, kv_bits=4),
    "W4A4KV4_GPTQ": dict(rotate=False, w_bits=4, w_method="gptq", a_bits=4, kv_bits=4),
    "W4A4KV4_GPTQ_rot": dict(rotate=True, w_bits=4, w_method="gptq", a_bits=4, kv_bits=4),
    "W4A4KV16_GPTQ_rot": dict(rotate=True, w_bits=4, w_method="gptq", a_bits=4),
    "W4A8_GPTQ_rot": dict(rotate=True, w_bits=4, w_method="gptq", a_bits=8, kv_bits=8),
    "W8A8_RTN": dict(rotate=False, w_bits=8, a_bits=8, kv_bits=8),
    "W8A8_RTN_rot": dict(rotate=True, w_bits=8, a_bits=8, kv_bits=8),
}


def _spec(fields: dict, seed: int, calib_batch: int):
    from jaxformers.quant import QuantSpec
    kw = dict(fields)
    kw.setdefault("a_clip", 0.9 if kw.get("a_bits", 16) <= 4 else 1.0)
    kw.setdefault("kv_clip", 0.95 if kw.get("kv_bits", 16) <= 4 else 1.0)
    if kw.get("w_method") == "gptq":  # (calib_batch is GPTQ's: RTN refuses it)
        kw["calib_batch"] = calib_batch
    return QuantSpec(seed=seed, **kw)


def _parser():
    ap = experiment_parser("quarot", __doc__, PRESETS, default_preset=None,
                           preset_help="model + training (without --run), calibration and int8 shapes "
                                       "(default: tiny; with --run: gpu on a GPU, else tiny)",
                           data_default=None,
                           data_help="corpus / prepared dataset (default: the run's or built-in)")
    ap.add_argument("--run", help="a trained llama run dir, or an HF Llama / Mistral / Qwen2 / Qwen3 dir "
                                  "(then --data)")
    ap.add_argument("--eval-batches", type=int, help="validation batches per scheme")
    ap.add_argument("--seq-len", type=int,
                    help="override the sequence length (training, eval, calibration; with --run: eval and "
                         "calibration, at most the model's max_seq_len)")
    ap.add_argument("--batch-size", type=int,
                    help="override the batch size (training and eval; with --run: eval)")
    ap.add_argument("--calib", type=int, help="calibration sequences (GPTQ, outlier statistics)")
    ap.add_argument("--only", help=f"comma list of schemes (default: all of {list(SCHEMES)})")
    ap.add_argument("--int-schemes", default=None,
                    help=f"comma list of integer-path rows (default: all of {list(INT_SCHEMES)}; "
                         "'none' alone: skip)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer of --data for a --run HF checkpoint (default: "
                                                      "its tokenizer.json); a run trained here uses its own")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the llama trained in OUT/runs/llama by an earlier invocation (checked first: "
                         "same model config and training settings, else exit; a run stopped by a signal is "
                         "continued from its checkpoint) instead of retraining it")
    return ap


def _check_args(ap, args) -> None:
    """Usage errors before anything is loaded or trained; ``--only`` / ``--int-schemes`` become
    lists (``--int-schemes none``: ``[]``)."""
    if args.run == "":
        ap.error("--run: empty path")
    if args.run and args.steps is not None:
        ap.error("--run: --steps only shapes the preset's training; a --run model is not retrained")
    if args.run and args.reuse:
        ap.error("--reuse keeps the llama this experiment trains in OUT/runs; with --run nothing is trained")
    check_run_args(ap, args)
    args.only = parse_list(ap, "--only", args.only, allowed=list(SCHEMES), unique=True)
    args.int_schemes = parse_list(ap, "--int-schemes", args.int_schemes, allowed=list(INT_SCHEMES),
                                  unique=True, none=True)


def _load_source(args, preset, out):
    """``(config, params, data, tokenizer, train_config dict, compute dtype, trained summary)``."""
    import jax
    from jaxformers import get_config
    from jaxformers.training import load_run
    from jaxformers.training.steps import resolve_dtype
    if args.run:
        run = Path(args.run)
        if run_kind(None, run) == "run":
            cfg, tc, params = load_run(run)
            data = args.data or tc.data
            return cfg, params, data, tc.tokenizer, dict(batch_size=tc.batch_size, seq_len=tc.seq_len,
                                                         eval_batches=tc.eval_batches), resolve_dtype(tc.dtype), None
        from jaxformers.convert.hf_llama import from_hf  # (--data, the tokenizer: _check_args)
        cfg, params = from_hf(str(run))
        tok = args.tokenizer
        dtype = "bfloat16" if jax.default_backend() != "cpu" else "float32"
        return cfg, params, args.data, tok, dict(
            batch_size=8, seq_len=min(2048, cfg.max_seq_len), eval_batches=40), dtype, None
    from jaxformers.training.trainer import open_dataset
    data, tok = args.data or "default", "byte"
    _, meta, _, _ = open_dataset(data, tok)
    m = dict(preset["model"])
    cfg = get_config("llama", m.pop("preset"), vocab_size=int(meta["vocab_size"]), **m)
    train_kw = train_overrides(preset["train"], args.steps, args.eval_batches)
    reusable = (check_reuse(out, [("llama", cfg)], seed=args.seed, data=data, train_kw=train_kw, log_points=10)
                if args.reuse else [])
    summary, params, dtype, tc = reuse_or_train("llama", cfg, out, reusable, seed=args.seed, data=data,
                                                train_kw=train_kw, log_points=10, tag="quarot")
    return cfg, params, data, tok, dict(batch_size=tc.batch_size, seq_len=tc.seq_len,
                                        eval_batches=tc.eval_batches), dtype, summary


def calibration_tokens(data, tokenizer, n, seq_len, seed):
    """``n`` random windows ``[n, seq_len]`` of the training split (every start in
    ``[0, len - seq_len]`` equally likely)."""
    import numpy as np
    from jaxformers.training.trainer import open_dataset
    _, _, train_tokens, _ = open_dataset(data, tokenizer)
    train_tokens = np.asarray(train_tokens)
    if len(train_tokens) < seq_len:  # (numpy's 'high <= 0' otherwise)
        raise ValueError(f"--seq-len {seq_len}: the training split of --data {str(data)!r} has "
                         f"{len(train_tokens)} tokens, too few for calibration windows of {seq_len} tokens "
                         f"(needs at least {seq_len}); use a shorter --seq-len or more data")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(train_tokens) - seq_len + 1, size=n)
    return np.stack([train_tokens[s:s + seq_len] for s in starts]).astype(np.int32)


OUTLIER_SEQUENCES = 64  # calibration sequences the outlier statistics read

# |val_ppl(fp_rot) / val_ppl(fp) - 1| allowed by float rounding of the rotated network (the
# rotation itself is exact): float32 rounds each op at ~6e-8 relative, so even after thousands of
# accumulated roundings (depth x width) the mean loss moves by far less than 1e-3; bf16 rounds at
# ~4e-3 relative, and the mean loss over the validation tokens moves by well under 2e-2 (a wrong
# rotation moves it by orders of magnitude more).  Measured so far: float32 tiny run 0.0, bf16 on
# a random tiny llama (CPU) 1.4e-5; the bf16 bound is to revisit once the gpu preset has run.
ROTATION_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2}


def rotation_check(schemes: dict, dtype: str):
    """``fp_rot`` vs ``fp`` (the module doc's "must match"): their perplexities, the relative
    difference, the tolerance for ``dtype`` (:data:`ROTATION_TOLERANCE`; other dtypes: the bf16
    one) and whether it is within it; ``None`` unless both schemes were evaluated."""
    import math
    if "fp" not in schemes or "fp_rot" not in schemes:
        return None
    a, b = schemes["fp"]["val_ppl"], schemes["fp_rot"]["val_ppl"]
    rel = abs(b / a - 1) if a > 0 and math.isfinite(a) and math.isfinite(b) else math.inf
    tol = ROTATION_TOLERANCE.get(str(dtype), ROTATION_TOLERANCE["bfloat16"])
    return {"fp_val_ppl": a, "fp_rot_val_ppl": b, "val_ppl_delta": b - a,
            "val_loss_delta": schemes["fp_rot"]["val_loss"] - schemes["fp"]["val_loss"],
            "rel_ppl_diff": rel, "tolerance": tol, "within_tolerance": bool(rel <= tol)}


def outlier_stats(cfg, params, calib, batch, seed):
    """Per linear input: channel max |x| profile and max/median, without and with rotation."""
    import numpy as np
    from jaxformers.quant import QuantSpec, collect_stats, quantize
    out = {}
    for label, rotate in (("original", False), ("rotated", True)):
        qcfg, qp = quantize(cfg, params, QuantSpec(rotate=rotate, seed=seed))
        stats = collect_stats(qcfg, qp, calib, batch)
        rows = {}
        for layer in sorted(stats, key=lambda s: int(s.split("_")[1])):
            for name, st in stats[layer].items():
                a = np.asarray(st["absmax"])
                rows[f"{layer}/{name}"] = {"max": float(a.max()), "median": float(np.median(a)),
                                           "max_over_median": float(a.max() / max(np.median(a), 1e-12)),
                                           "channel_absmax": [float(v) for v in a]}
        out[label] = rows
    return out


def int8_table(shapes, dtype_name, warmup=2, iters=10):
    """The real W8A8 linear vs a dense matmul: ms, weight bytes, agreement with fake quant."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxformers.quant import fake_quant, int8_linear, pack_int4, rtn_weight
    dt = jnp.dtype(dtype_name)
    rows = []
    for tokens, din, dout in shapes:
        kx, kw = jax.random.split(jax.random.PRNGKey(din + dout))
        x = jax.random.normal(kx, (tokens, din), jnp.float32).astype(dt)
        w = np.asarray(jax.random.normal(kw, (din, dout), jnp.float32)) * din ** -0.5
        deq, q, s, _ = rtn_weight(w, 8, clip_search=False, return_int=True)
        qw, sw = jnp.asarray(q, jnp.int8), jnp.asarray(s[0], jnp.float32)
        wd = jnp.asarray(w, dt)
        f_int8 = jax.jit(lambda x, qw, sw: int8_linear(x, qw, sw))
        f_dense = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
        fake = jnp.matmul(fake_quant(x.astype(jnp.float32), 8), jnp.asarray(deq, jnp.float32),
                          precision="highest")
        diff = float(jnp.max(jnp.abs(f_int8(x, qw, sw).astype(jnp.float32) - fake)) /
                     float(jnp.max(jnp.abs(fake))))
        q4 = np.clip(np.round(w / (np.abs(w).max(0, keepdims=True) / 7)), -8, 7).astype(np.int8)
        rows.append(dict(tokens=tokens, d_in=din, d_out=dout, compute_dtype=dtype_name,
                         int8_ms=median_ms(f_int8, (x, qw, sw), warmup, iters),
                         dense_ms=median_ms(f_dense, (x, wd), warmup, iters),
                         weight_bytes_dense=int(wd.size * dt.itemsize), weight_bytes_int8=int(qw.size),
                         weight_bytes_int4_packed=int(pack_int4(jnp.asarray(q4)).size),
                         max_rel_diff_vs_fake_quant=diff))
        r = rows[-1]
        print(f"[quarot] int8 linear {tokens}x{din}->{dout}: int8 {r['int8_ms']:.3f} ms, "
              f"{dtype_name} {r['dense_ms']:.3f} ms, rel diff {diff:.2e}", file=sys.stderr, flush=True)
    return rows


def _linear_bytes(params) -> dict:
    """Bytes of the block linears' parameters: ``{"weights", "scales"}`` (the q/k norms of a
    ``qk_norm`` model are not linears)."""
    out = {"weights": 0, "scales": 0}
    for key, blk in params.items():
        if key.startswith("blocks_"):
            for sub in ("attn", "mlp"):
                for lin in blk[sub].values():
                    if "kernel" not in lin and "qkernel" not in lin:
                        continue
                    for name, x in lin.items():
                        out["scales" if name == "scale" else "weights"] += int(x.size) * x.dtype.itemsize
    return out


def _int_linear_bytes(params, w_bits: int) -> dict:
    """:func:`_linear_bytes` of ``params`` (float block linears) once stored as integers
    (``QuantSpec(storage="int")``), from the shapes alone: int8 weights (``w_bits > 4``) or
    int4 packed two per byte, float32 scales per output channel, the rest (biases) as they are."""
    import numpy as np
    from jaxformers.quant.api import _N_IN
    out = {"weights": 0, "scales": 0}
    for key, blk in params.items():
        if key.startswith("blocks_"):
            for sub in ("attn", "mlp"):
                for lname, lin in blk[sub].items():
                    if "kernel" not in lin:  # the q/k norms of a qk_norm model
                        continue
                    for name, x in lin.items():
                        if name == "kernel":
                            out["weights"] += int(x.size) // (2 if w_bits <= 4 else 1)
                            out["scales"] += 4 * int(np.prod(x.shape[_N_IN.get(lname, 1):]))
                        else:
                            out["weights"] += int(x.size) * x.dtype.itemsize
    return out


def int_path(cfg, params, dtype_name, tokens, names, seed, warmup=2, iters=5):
    """Integer-storage model vs the fake-quant model with the same weights (see module doc):
    weight memory per storage format and forward time / logit agreement per scheme."""
    import jax
    import jax.numpy as jnp
    from jaxformers import build
    from jaxformers.quant import QuantSpec, quantize, unpack_int4
    fns = {}

    def forward(c):  # one compile per config (fake W8A8 / W4A8 share one)
        c = c.replace(dtype=dtype_name)
        if c not in fns:
            fns[c] = jax.jit(build(c).apply)
        return fns[c]

    tokens = jnp.asarray(tokens)
    n = sum(_linear_bytes(params).values()) // jnp.dtype(params["blocks_0"]["mlp"]["up"]["kernel"].dtype).itemsize
    memory = {"float32": {"weights": 4 * n, "scales": 0}, "bfloat16": {"weights": 2 * n, "scales": 0},
              "int8": _int_linear_bytes(params, 8), "int4_packed": _int_linear_bytes(params, 4)}
    stored = {}
    for w_bits in dict.fromkeys(INT_SCHEMES[name][0] for name in names):  # only the widths the rows use
        stored[w_bits] = quantize(cfg, params, QuantSpec(storage="int", rotate=True, seed=seed, w_bits=w_bits,
                                                         w_clip=False))
    for row in memory.values():
        row["total"] = row["weights"] + row["scales"]
        row["ratio_to_float32"] = row["total"] / (4 * n)
    fp_params = {"params": params}
    fp_ms = median_ms(forward(cfg), (fp_params, tokens), warmup, iters)
    rows = []
    for name in names:
        w_bits, a_bits = INT_SCHEMES[name]
        icfg, ip = stored[w_bits]
        icfg = icfg.replace(a_bits=a_bits, a_clip=0.9 if a_bits <= 4 else 1.0)
        fake = jax.tree_util.tree_map(lambda x: x, ip)
        for key, blk in fake.items():  # the same weights, dequantized to float32
            if key.startswith("blocks_"):
                for sub in ("attn", "mlp"):
                    for lname, lin in blk[sub].items():
                        if "qkernel" not in lin:  # the q/k norms of a qk_norm model
                            continue
                        q = unpack_int4(lin["qkernel"]) if w_bits <= 4 else lin["qkernel"]
                        blk[sub][lname] = {**{k: v for k, v in lin.items() if k not in ("qkernel", "scale")},
                                           "kernel": q.astype(jnp.float32) * lin["scale"]}  # (+ bias)
        fcfg = icfg.replace(int_linears=False)
        li = forward(icfg)({"params": ip}, tokens).astype(jnp.float32)
        lf = forward(fcfg)({"params": fake}, tokens).astype(jnp.float32)
        diff = float(jnp.max(jnp.abs(li - lf)) / jnp.max(jnp.abs(lf)))
        pos_off = jnp.max(jnp.abs(li - lf), -1) > 1e-4 * jnp.max(jnp.abs(lf))

        def nll(logits):  # next-token loss on the timing batch
            lp = jax.nn.log_softmax(logits[:, :-1])
            return float(-jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)))
        rows.append(dict(scheme=name, w_bits=w_bits, a_bits=a_bits,
                         frac_positions_off=float(jnp.mean(pos_off)),
                         nll_int=nll(li), nll_fake_quant=nll(lf),
                         int_ms=median_ms(forward(icfg), ({"params": ip}, tokens), warmup, iters),
                         fake_quant_ms=median_ms(forward(fcfg), ({"params": fake}, tokens), warmup, iters),
                         max_rel_logit_diff=diff, linear_bytes=memory["int8" if w_bits == 8 else "int4_packed"]["total"]))
        r = rows[-1]
        print(f"[quarot] int path {name}: int {r['int_ms']:.2f} ms, fake-quant {r['fake_quant_ms']:.2f} ms, "
              f"fp {fp_ms:.2f} ms, logit rel diff {diff:.1e} ({r['frac_positions_off']:.1%} positions), "
              f"nll {r['nll_int']:.4f} vs {r['nll_fake_quant']:.4f}", file=sys.stderr, flush=True)
    return {"tokens": list(tokens.shape), "compute_dtype": dtype_name, "fp_ms": fp_ms,
            "weight_memory": memory, "schemes": rows, "weights": "rotated RTN, no clipping search"}


def run(args, ap=None) -> dict:
    """The experiment (``args`` checked by :func:`_check_args`; ``ap``: the parser, for the usage
    errors that need the loaded model)."""
    import jax
    from jaxformers.quant import quantize
    from jaxformers.training import evaluate
    if args.preset is None:
        args.preset = "gpu" if args.run and jax.default_backend() == "gpu" else "tiny"
    preset = json.loads(json.dumps(PRESETS[args.preset]))
    if args.seq_len is not None:
        preset["train"]["seq_len"] = preset["model"]["max_seq_len"] = args.seq_len
    if args.batch_size is not None:
        preset["train"]["batch_size"] = args.batch_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_results(out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    cfg, params, data, tok, ev_kw, dtype, summary = _load_source(args, preset, out)
    if cfg.model != "llama":
        usage_error(ap, f"--run: QuaRot needs a llama model (RMSNorm, SwiGLU), got model {cfg.model!r}")
    check_data_vocab(ap, data, tok, cfg.vocab_size)  # before anything is evaluated
    cfg, params = unrolled(cfg, params)
    if args.run:  # the run's (or the HF default's) eval shape, unless given
        if args.seq_len is not None:
            if args.seq_len > cfg.max_seq_len:
                usage_error(ap, f"--seq-len {args.seq_len} is longer than the model's "
                                f"max_seq_len={cfg.max_seq_len}")
            ev_kw["seq_len"] = args.seq_len
        if args.batch_size is not None:
            ev_kw["batch_size"] = args.batch_size
    if args.eval_batches is not None:
        ev_kw["eval_batches"] = args.eval_batches
    schemes = list(SCHEMES) if args.only is None else args.only  # checked names (_check_args)
    n_calib = preset["calib"] if args.calib is None else args.calib
    try:
        calib = calibration_tokens(data, tok, n_calib, ev_kw["seq_len"], args.seed + 1)
    except ValueError as e:  # data too short for the windows
        usage_error(ap, str(e))
    results = {"preset": args.preset, "run": args.run, "seed": args.seed, "data": data,
               "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
               "jax_version": jax.__version__, "compute_dtype": dtype, "model": cfg.to_dict(),
               "calibration": {"sequences": n_calib, "seq_len": ev_kw["seq_len"]},
               "eval": ev_kw, "train_summary": summary, "schemes": {}, "fp_rot_vs_fp": None}
    int_names = list(INT_SCHEMES) if args.int_schemes is None else args.int_schemes  # checked (_check_args)
    if int_names:  # first: a GPU stage cut by its time limit keeps it
        results["int_path"] = int_path(cfg, params, dtype, calib[: ev_kw["batch_size"]], int_names, args.seed)
        save_progress(out, results)
    for name in schemes:
        spec = _spec(SCHEMES[name], args.seed, preset["calib_batch"])
        t0 = time.perf_counter()
        qcfg, qparams = quantize(cfg, params, spec, calibration=calib if spec.w_method == "gptq" else None)
        t_quant = time.perf_counter() - t0
        ev = evaluate((qcfg, qparams), data, tokenizer=tok, batch_size=ev_kw["batch_size"],
                      seq_len=ev_kw["seq_len"], max_batches=ev_kw["eval_batches"], dtype=dtype)
        results["schemes"][name] = {"spec": {k: v for k, v in vars(spec).items()},
                                    "val_loss": ev["val_loss"], "val_ppl": ev["val_ppl"],
                                    "quantize_s": round(t_quant, 2)}
        print(f"[quarot] {name}: val_ppl={ev['val_ppl']:.4f} (quantize {t_quant:.1f} s)",
              file=sys.stderr, flush=True)
        # null until both fp and fp_rot are evaluated; set as soon as they are (a stage cut short keeps it)
        results["fp_rot_vs_fp"] = rc = rotation_check(results["schemes"], dtype)
        if rc is not None and name in ("fp", "fp_rot"):
            print(f"[quarot] fp_rot vs fp: val_ppl {rc['fp_rot_val_ppl']:.4f} vs {rc['fp_val_ppl']:.4f} "
                  f"(relative difference {rc['rel_ppl_diff']:.2e}, tolerance {rc['tolerance']:.0e})"
                  + ("" if rc["within_tolerance"] else
                     " -- WARNING: THE ROTATED MODEL DOES NOT MATCH THE UNROTATED ONE (rotation not exact: "
                     "every *_rot number is suspect)"), file=sys.stderr, flush=True)
        # partial results after every scheme, "complete": false (a GPU stage cut by its time
        # limit keeps them, and they are not mistaken for a finished run)
        save_progress(out, results)
    results["outlier_sequences"] = min(len(calib), OUTLIER_SEQUENCES)
    results["outliers"] = outlier_stats(cfg, params, calib[:OUTLIER_SEQUENCES], preset["calib_batch"], args.seed)
    results["int8_linear"] = int8_table(preset["linear_shapes"], dtype)
    results["complete"] = True
    write_json(out / "results.json", results, indent=1)
    plot(results, out)
    return results


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    sch = results["schemes"]
    names = list(sch)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4.5))
    ppl = [sch[n]["val_ppl"] for n in names]
    ax.bar(range(len(names)), ppl, color=["tab:green" if n.endswith("rot") else "tab:gray" for n in names])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity (log)")
    ax.set_title(f"QuaRot ({results['preset'] or results['run']}, seed {results['seed']}; green: rotated)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "quarot_ppl.png", dpi=120)
    plt.close(fig)
    o = results["outliers"]
    keys = list(o["original"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    x = np.arange(len(keys))
    axes[0].bar(x - 0.2, [o["original"][k]["max_over_median"] for k in keys], 0.4, label="original")
    axes[0].bar(x + 0.2, [o["rotated"][k]["max_over_median"] for k in keys], 0.4, label="rotated")
    axes[0].set_xticks(x)
    axes[0].set_xticklabels(keys, rotation=70, ha="right", fontsize=6)
    axes[0].set_ylabel("max / median of per-channel max|x|")
    axes[0].set_yscale("log")
    axes[0].legend()
    worst = max(keys, key=lambda k: o["original"][k]["max_over_median"])
    for label in ("original", "rotated"):
        axes[1].plot(o[label][worst]["channel_absmax"], lw=0.8, label=label)
    axes[1].set_xlabel(f"channel of {worst}")
    axes[1].set_ylabel("max |x| over calibration tokens")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "quarot_outliers.png", dpi=120)
    plt.close(fig)
    ip = results.get("int_path")
    if not ip:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mem = ip["weight_memory"]
    axes[0].bar(range(len(mem)), [m["total"] / 2 ** 20 for m in mem.values()], color="tab:blue")
    axes[0].set_xticks(range(len(mem)))
    axes[0].set_xticklabels(list(mem))
    axes[0].set_ylabel("block-linear parameters (MiB)")
    rows = ip["schemes"]
    x = np.arange(len(rows))
    axes[1].bar(x - 0.2, [r["fake_quant_ms"] for r in rows], 0.4, label="fake quant (float)")
    axes[1].bar(x + 0.2, [r["int_ms"] for r in rows], 0.4, label="integer path")
    axes[1].axhline(ip["fp_ms"], color="k", lw=0.8, ls="--", label="unquantized")
    axes[1].set_xticks(x)
    axes[1].set_xticklabels([r["scheme"] for r in rows])
    axes[1].set_ylabel(f"forward ms, tokens {ip['tokens']} ({results['device_kind']})")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quarot_int.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = _parser()
    args = parse_experiment_args(ap, argv, check=_check_args)
    return run(args, ap)


if __name__ == "__main__":
    main()
