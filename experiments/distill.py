"""Distilled Mamba reasoners: distil a transformer into pure / hybrid Mamba-2 students, then
compare them at a fixed generation-time budget ("Thinking Slow, Fast").

    python -m experiments.distill --preset tiny --out runs/distill-tiny        # a few CPU minutes
    python -m experiments.distill --teacher RUN_DIR --student hybrid --attn-layers 3 --out DIR

Task: multi-digit addition with worked steps (``synthetic:arithmetic``, a chain of thought:
one ``a_i+b_i+c_i=c s;`` step per digit, then the answer), answers exactly checkable.

1. **Teacher**: ``--teacher RUN_DIR`` (a ``llama`` / ``gpt`` run trained here on the preset's
   task, same format options, its training finished), else a ``llama`` trained on the task
   (``runs/teacher``).
2. **Students** (``runs/<student>``, normal run directories: ``evaluate`` / ``generate`` work
   on them): ``mamba2`` (every layer an SSM) and ``hybrid`` (attention kept at
   ``--attn-layers``), attention-initialised (:func:`jaxformers.distill.init_student`) and
   distilled with a KL loss on the teacher's logits (:class:`jaxformers.distill.DistillStep`,
   teacher in the same compiled step), after ``--align-steps`` of layer-wise alignment
   (``stage="align"``: each converted layer fed the teacher's hidden states, ``runs/<student>_align``);
   plus ``mamba2_random`` (random SSM init, no alignment, same distillation) for the
   initialisation comparison.  Reported per student: KL to the teacher on validation
   sequences at initialisation, after alignment and after distillation, validation loss,
   greedy answer accuracy, the distillation loss's first and last logged values.
3. **Throughput**: tokens/s of batched sampling (``generate(num_samples=k)``: one prefill per
   prompt, k rows decoding) for every model, per batch size and generation length.
4. **Fixed time budget**: ``k`` sampled chains of thought per problem (temperature
   ``--temperature``) for k in the preset's list: coverage (any of the k answers right) and
   majority-vote accuracy vs the measured generation time per problem -> ``coverage.png``.

``OUT/results.json`` holds every number (seed, settings, environment), rewritten after every
model (``complete`` false until the end); ``--steps`` /
``--teacher-steps`` / ``--align-steps`` / ``--problems`` / ``--samples`` / ``--students`` /
``--speed-batches`` / ``--speed-lengths`` shrink a run (tests).
Times are wall-clock on the machine that ran it (CPU numbers say little about a GPU, where
the SSM students' constant-size state is what makes large-batch sampling fast).

The KL numbers (``kl_init`` / ``kl_aligned`` / ``kl_final``) are per-token KL(teacher || student)
on ``val_sequences`` (64) held-out validation sequences, averaged over the positions the distillation trains (the task's ``loss_mask``: every target
after ``=``), like ``kd_loss`` and ``val_loss``; the prompt's operand digits are random and
never distilled.  The validation sequences and the test problems are held-out problems
(:func:`jaxformers.data.synthetic.draw_split`): no model trained on them.

Interruption: a stop signal (a GPU stage's time limit, Ctrl-C) ends the experiment after a
checkpoint of the run in progress (a partly trained model is never reported).  ``--reuse``
keeps the finished runs in ``OUT/runs`` of an earlier invocation and continues a run a signal
stopped from its checkpoint, only when its model config, training settings and distillation
record (``distill.json``: stage, loss weights, initialisation, the teacher's parameters'
SHA-256) equal this invocation's; a finished run with other settings is an error (checked
before anything trains); a student of another teacher is trained again.
"""
from __future__ import annotations

import collections
import functools
import json
import sys
import time
from pathlib import Path

from experiments.common import (check_finished, experiment_parser, parse_experiment_args, parse_list,
                                save_progress, start_results, usage_error, write_json, write_results)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("coverage.png",)

PRESETS = {
    # the teacher's greedy accuracy on held-out 3-digit sums: 0.95-1.00 over 9 seeds after 800 steps
    # (0.21-1.00 after 500: some seeds learn the carries late); 0.94 at seed 0
    "tiny": dict(digits=3, teacher=dict(d_model=64, n_layer=4, n_head=4, n_kv_head=2, d_ff=176, max_seq_len=256),
                 teacher_train=dict(steps=800, batch_size=32, lr=3e-3, warmup_steps=30),
                 distill_train=dict(steps=300, batch_size=32, lr=2e-3, warmup_steps=30), align_steps=50,
                 attn_layers=(3,), problems=64, samples=(1, 2, 4, 8, 16), temperature=1.0,
                 speed_batches=(1, 16, 64), speed_lengths=(64, 256), eval_batches=4),
    "gpu": dict(digits=8, teacher=dict(d_model=512, n_layer=8, n_head=8, n_kv_head=4, d_ff=1408, max_seq_len=2048),
                teacher_train=dict(steps=3000, batch_size=64, lr=1e-3, warmup_steps=200),
                distill_train=dict(steps=1500, batch_size=64, lr=5e-4, warmup_steps=100), align_steps=300,
                attn_layers=(3, 7), problems=256, samples=(1, 2, 4, 8, 16, 32, 64), temperature=1.0,
                speed_batches=(1, 16, 64, 256), speed_lengths=(256, 1024, 2048), eval_batches=16),
}


STUDENTS = ("mamba2", "hybrid", "mamba2_random")
SPEED_PROMPT = 8  # prompt tokens of the throughput table's generations
VAL_SEQUENCES = 64  # held-out validation sequences of the KL numbers (``val_sequences`` in results.json)


def _parser():
    ap = experiment_parser("distill", __doc__, PRESETS, steps_help="override the distillation steps",
                           data=False)
    ap.add_argument("--teacher", help="a trained llama/gpt run directory (default: train one on the task)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--students", help=f"comma-separated students: {', '.join(STUDENTS)} (default: all)")
    which.add_argument("--student", choices=("mamba2", "hybrid"), help="distil only this student")
    ap.add_argument("--attn-layers", help="hybrid: comma-separated teacher layers kept as attention "
                                          "(default: the preset's)")
    ap.add_argument("--align-steps", type=int,
                    help="layer-wise alignment steps before distillation, attention-initialised students "
                         "only (default: the preset's; 0 skips the stage)")
    ap.add_argument("--teacher-steps", type=int, help="override the teacher's training steps")
    ap.add_argument("--problems", type=int, help="override the number of test problems")
    ap.add_argument("--samples", help="comma-separated samples per problem, e.g. 1,4,16")
    ap.add_argument("--temperature", type=float, help="sampling temperature (default: the preset's)")
    ap.add_argument("--speed-batches", help="comma-separated batch sizes of the throughput table")
    ap.add_argument("--speed-lengths", help="comma-separated generation lengths of the throughput table "
                    f"(> the {SPEED_PROMPT}-token prompt, <= the teacher's max_seq_len)")
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=0.0)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the finished runs in OUT/runs trained with the same settings (and continue "
                         "the ones a signal stopped) instead of retraining them")
    return ap


# ----------------------------------------------------------------------------- pieces
def _train_config(out, name, data, seq_len, train_kw, seed, eval_batches, steps=None):
    from jaxformers.training import TrainConfig

    kw = dict(train_kw)
    if steps is not None:
        kw.update(steps=steps, warmup_steps=min(kw["warmup_steps"], steps // 10))
    return TrainConfig(seed=seed, data=data, out_dir=str(Path(out) / "runs" / name), seq_len=seq_len,
                       checkpoint_every=0, keep_checkpoints=1, eval_every=0, eval_batches=eval_batches,
                       log_every=max(1, kw["steps"] // 20), **kw)


def _fresh(run_dir):
    import shutil

    if Path(run_dir).exists():
        shutil.rmtree(run_dir)


def mean_kl(teacher, teacher_params, student, student_params, rows, loss_mask=None) -> float:
    """Mean per-token KL(teacher || student) of ``rows`` ``[N, T+1]`` over the positions
    ``kd_loss`` distils: input position ``t`` weighted by ``loss_mask[:, t + 1]`` (``[N, T+1]``,
    the target's weight); ``loss_mask=None``: every input position."""
    import jax.numpy as jnp
    import numpy as np

    rows = np.asarray(rows)
    weights = (np.ones((rows.shape[0], rows.shape[1] - 1), np.float32) if loss_mask is None
               else np.asarray(loss_mask, np.float32)[:, 1:])
    if weights.shape != (rows.shape[0], rows.shape[1] - 1) or not weights.sum() > 0:
        raise ValueError(f"loss_mask must be [N, T+1] = {list(rows.shape)} with some weight, "
                         f"got shape {list(np.shape(loss_mask))}")

    return float(_weighted_kl_program()(teacher, student, teacher_params, student_params,
                                        jnp.asarray(rows[:, :-1]), jnp.asarray(weights)))


def _weighted_kl_impl(teacher, student, tp, sp, tokens, w):
    from jaxformers.distill import kl_per_token
    per_token = kl_per_token(teacher.apply({"params": tp}, tokens), student.apply({"params": sp}, tokens))
    return (per_token * w).sum() / w.sum()


@functools.lru_cache(maxsize=None)
def _weighted_kl_program():
    """``_weighted_kl_impl`` jitted once, the modules static (hashable flax dataclasses): one
    compiled program per (teacher, student, shapes), shared by the experiment's KL measurements
    (a jit made inside ``mean_kl`` compiled anew on every call)."""
    import jax
    return jax.jit(_weighted_kl_impl, static_argnums=(0, 1))


# ----------------------------------------------------------------------------- --reuse
def params_sha256(params) -> str:
    """SHA-256 of a parameter tree (paths, dtypes, shapes and bytes): a teacher's identity."""
    import hashlib

    import jax
    import numpy as np

    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}|".encode())
        h.update(x.tobytes())
    return h.hexdigest()


RECORD = "distill.json"  # a run's distillation record (stage, weights, init, teacher), read by --reuse


def reuse_state(run_dir, cfg, tc, record, *, check_teacher_sha: bool = True):
    """``"finished"`` (reuse it), ``"stopped"`` (a signal stopped it: continue from its
    checkpoint) or ``None`` (train from scratch: no run, a run a signal stopped with other
    settings, or a student of another teacher) for ``run_dir`` trained with model config
    ``cfg``, ``TrainConfig`` ``tc`` and distillation ``record``; ``SystemExit`` naming the run
    and the differing fields when a finished run was trained with other settings.
    ``check_teacher_sha=False``: the teacher's identity is not known yet (checked later)."""
    from jaxformers.training.rundir import check_resume, config_diff, train_config_changes

    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return None
    stopped = not json.loads((run_dir / "summary.json").read_text()).get("finished", True)
    try:
        saved = check_resume(run_dir, cfg)
        changes = list(train_config_changes(saved, tc))
    except ValueError as e:
        changes = [str(e)]
    old = json.loads((run_dir / RECORD).read_text()) if (run_dir / RECORD).is_file() else {}
    new = json.loads(json.dumps(record))
    teacher_changed = old.get("teacher_sha256") != new.get("teacher_sha256")
    changes += config_diff(old, new, ignore=("teacher_sha256",))
    if changes and not stopped:
        raise SystemExit(f"--reuse: cannot reuse {run_dir}: it was trained with other settings: "
                         + "; ".join(changes) + "\n(rerun without --reuse to retrain, or use another --out)")
    if changes or (check_teacher_sha and teacher_changed):
        return None
    return "stopped" if stopped else "finished"


def train_stage(name, cfg, tc, record, *, reuse: bool, **train_kw):
    """``(summary, reused)`` of run ``tc.out_dir``: with ``reuse`` a finished run of the same
    settings (:func:`reuse_state`) is kept (``reused``), and one a signal stopped is continued;
    else it is trained from scratch (an old run there is removed).  ``SystemExit`` when a signal
    stops it."""
    from jaxformers.training import train

    run_dir = Path(tc.out_dir)
    state = reuse_state(run_dir, cfg, tc, record) if reuse else None
    if state == "finished":
        print(f"[distill] reusing {run_dir}", file=sys.stderr, flush=True)
        return json.loads((run_dir / "summary.json").read_text()), True
    if state is None:
        _fresh(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / RECORD, record)  # before training: a stopped run is continued only with it
    print(f"[distill] {'continuing' if state else 'training'} {name}", file=sys.stderr, flush=True)
    summary = train(cfg, tc, progress=False, resume=state == "stopped", **train_kw)
    check_finished(summary, name, "distill")
    return summary, False


def extract_answers(generated, digits: int):
    """The ``digits + 1`` answer digits after SEP of each generated row (None if absent)."""
    import numpy as np

    from jaxformers.data.synthetic import SEP

    out = []
    for row in np.asarray(generated).tolist():
        try:
            i = row.index(SEP)
        except ValueError:
            out.append(None)
            continue
        ans = tuple(row[i + 1:i + 2 + digits])
        out.append(ans if len(ans) == digits + 1 else None)
    return out


def sample_problems(module, params, prompts, answers, k: int, new_tokens: int, digits: int, temperature: float,
                    seed: int):
    """``(seconds, coverage, majority accuracy)`` of k samples per prompt (compiled, warm)."""
    import jax

    import jaxformers as jf

    def run():
        return jf.generate(module, {"params": params}, prompts, new_tokens, temperature=temperature,
                           rng=jax.random.PRNGKey(seed), num_samples=k)

    jax.block_until_ready(run())  # compile
    t0 = time.perf_counter()
    out = jax.block_until_ready(run())
    seconds = time.perf_counter() - t0
    got = extract_answers(out[:, prompts.shape[1]:], digits)
    covered = majority = 0
    for p, truth in enumerate(answers):
        mine = got[p * k:(p + 1) * k]
        covered += any(a == truth for a in mine)
        votes = collections.Counter(a for a in mine if a is not None)
        majority += bool(votes) and votes.most_common(1)[0][0] == truth
    n = len(answers)
    return seconds, covered / n, majority / n


def throughput(module, params, batch: int, length: int, prompt_len: int = SPEED_PROMPT) -> float:
    """Generated tokens/s of ``generate`` for ``batch`` rows of ``length`` tokens (best of 2)."""
    import jax
    import jax.numpy as jnp

    import jaxformers as jf

    prompt = jnp.full((batch, prompt_len), 5, jnp.int32)
    new = length - prompt_len

    def run():
        return jf.generate(module, {"params": params}, prompt, new, temperature=1.0, rng=jax.random.PRNGKey(0))

    jax.block_until_ready(run())
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - t0)
    return batch * new / best


# ----------------------------------------------------------------------------- the experiment
def _check_args(ap, args) -> None:
    """Usage errors before anything is loaded or trained (with ``--teacher``, the checks that
    need its depth and length follow in :func:`check_teacher`); the list options become lists."""
    import math

    preset = PRESETS[args.preset]
    if args.teacher is not None:
        if not (Path(args.teacher) / "config.json").is_file():
            ap.error(f"--teacher {args.teacher!r}: not a run directory (no config.json)")
        summary = Path(args.teacher) / "summary.json"
        if summary.is_file() and not json.loads(summary.read_text()).get("finished", True):
            s = json.loads(summary.read_text())
            ap.error(f"--teacher {args.teacher!r}: its training was stopped at step {s.get('final_step')} of "
                     f"{s.get('steps')} (resume it first: a partly trained teacher)")
        if args.teacher_steps is not None:
            ap.error("--teacher-steps trains the preset's teacher; --teacher gives a trained one "
                     "(drop one of them)")
        check_teacher_task(ap, args, json.loads((Path(args.teacher) / "config.json").read_text()))
        if not summary.is_file():  # train() writes it at the end (or at a signal's stop)
            ap.error(f"--teacher {args.teacher!r}: no summary.json, so its training never finished (killed, "
                     "crashed or still running): its newest checkpoint is a partly trained teacher (resume it first)")
    students = parse_list(ap, "--students", args.students, allowed=STUDENTS, unique=True)
    args.students = [args.student] if args.student else list(STUDENTS) if students is None else students
    args.attn_layers = parse_list(ap, "--attn-layers", args.attn_layers, cast=int, lo=0, unique=True)
    if args.attn_layers is not None and "hybrid" not in args.students:
        ap.error("--attn-layers applies to the hybrid student, which is not among the students")
    if args.align_steps is not None and all(s.endswith("random") for s in args.students):
        ap.error("--align-steps applies to the attention-initialised students (mamba2, hybrid), which are "
                 "not among the students (the random-init student is never aligned)")
    args.samples = parse_list(ap, "--samples", args.samples, cast=int, lo=1, unique=True)
    args.speed_batches = parse_list(ap, "--speed-batches", args.speed_batches, cast=int, lo=1, unique=True)
    args.speed_lengths = parse_list(ap, "--speed-lengths", args.speed_lengths, cast=int, lo=SPEED_PROMPT + 1,
                                    unique=True)
    for flag, value in (("--temperature", args.temperature), ("--kl-weight", args.kl_weight),
                        ("--ce-weight", args.ce_weight)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            ap.error(f"{flag} must be a finite number >= 0, got {value}")
    if args.kl_weight == 0 and args.ce_weight == 0:
        ap.error("--kl-weight and --ce-weight are both 0: the distillation loss would be 0 (set one > 0)")
    if args.teacher is None:
        check_teacher(ap, args, preset["teacher"]["n_layer"], preset["teacher"]["max_seq_len"])


def task_spec(preset: str) -> str:
    """The data spec of a preset's task (the teacher's, the students' and the evaluation's)."""
    return f"synthetic:arithmetic:n_digits={PRESETS[preset]['digits']}"


def check_teacher_task(ap, args, saved: dict) -> None:
    """Usage error unless the ``--teacher`` run (its saved ``config.json``) was trained on this
    preset's task with the same format options: the students are distilled, validated and
    tested on that task's rows, the test problems on its held-out split."""
    from jaxformers.data.sources import parse_synthetic_spec

    task = task_spec(args.preset)
    data = (saved.get("train") or {}).get("data") if isinstance(saved, dict) else None
    try:
        same = isinstance(data, str) and data.startswith("synthetic:") and \
            parse_synthetic_spec(data)[:2] == parse_synthetic_spec(task)[:2]
    except ValueError:
        same = False
    if not same:
        ap.error(f"--teacher {args.teacher!r}: trained on data={data!r}, not on the {args.preset} preset's "
                 f"task {task!r} (train the teacher on it, or choose the preset whose task it is)")


def check_teacher(ap, args, n_layer: int, max_seq_len: int) -> None:
    """Usage errors for settings (given, or the preset's) that the teacher (``n_layer`` layers,
    ``max_seq_len`` positions) rules out."""
    preset = PRESETS[args.preset]
    if "hybrid" in args.students:
        layers = preset["attn_layers"] if args.attn_layers is None else args.attn_layers
        bad = [i for i in layers if i >= n_layer]
        if bad:
            flag = "--attn-layers" if args.attn_layers is not None else \
                f"the {args.preset} preset's attention layers {list(layers)} (set --attn-layers)"
            usage_error(ap, f"{flag}: {bad} not a layer of the {n_layer}-layer teacher (0 .. {n_layer - 1})")
        if set(layers) >= set(range(n_layer)):
            flag = "--attn-layers" if args.attn_layers is not None else \
                f"the {args.preset} preset's attention layers {list(layers)} (set --attn-layers)"
            usage_error(ap, f"{flag}: every layer of the {n_layer}-layer teacher kept as attention leaves the "
                            "hybrid student no Mamba-2 layer (leave at least one out)")
    lengths = preset["speed_lengths"] if args.speed_lengths is None else args.speed_lengths
    long = [n for n in lengths if n > max_seq_len]
    if long:
        flag = "--speed-lengths" if args.speed_lengths is not None else \
            f"the {args.preset} preset's speed lengths {list(lengths)} (set --speed-lengths)"
        usage_error(ap, f"{flag}: {long} longer than the teacher's max_seq_len={max_seq_len}")


def run(args, ap=None) -> dict:
    """The experiment (``args`` checked by :func:`_check_args`; ``ap``: the parser, for the usage
    errors that need a ``--teacher`` run)."""
    import jax
    import numpy as np

    import jaxformers as jf
    from jaxformers.data.synthetic import arithmetic, arithmetic_length, arithmetic_prompt_length, draw_split
    from jaxformers.distill import DistillStep, init_student, student_config
    from jaxformers.training import load_run
    from jaxformers.training.rundir import read_metrics

    preset = PRESETS[args.preset]
    digits = preset["digits"]
    seq_len = arithmetic_length(digits) - 1
    data = task_spec(args.preset)
    # the list options: checked lists (_check_args), None where not given
    attn_layers = preset["attn_layers"] if args.attn_layers is None else tuple(args.attn_layers)
    students = args.students
    samples = preset["samples"] if args.samples is None else tuple(args.samples)
    temperature = preset["temperature"] if args.temperature is None else args.temperature
    speed_batches = preset["speed_batches"] if args.speed_batches is None else tuple(args.speed_batches)
    speed_lengths = preset["speed_lengths"] if args.speed_lengths is None else tuple(args.speed_lengths)
    n_problems = preset["problems"] if args.problems is None else args.problems
    results = {"preset": args.preset, "seed": args.seed, "task": data, "seq_len": seq_len,
               "temperature": temperature, "samples": list(samples), "problems": n_problems,
               "kl_weight": args.kl_weight, "ce_weight": args.ce_weight}

    # 1. teacher
    reuse = bool(getattr(args, "reuse", False))
    if args.teacher:
        teacher_cfg, _, teacher_params = load_run(args.teacher)
        check_teacher(ap, args, teacher_cfg.n_layer, teacher_cfg.max_seq_len)  # before any training
        results["teacher_run"] = str(args.teacher)
    else:
        teacher_cfg = jf.get_config("llama", "tiny", vocab_size=18, **preset["teacher"])
        teacher_tc = _train_config(args.out, "teacher", data, seq_len, preset["teacher_train"], args.seed,
                                   preset["eval_batches"], args.teacher_steps)
        results["teacher_run"] = teacher_tc.out_dir
    align_steps = preset["align_steps"] if args.align_steps is None else args.align_steps
    kd_settings = DistillStep(teacher_cfg, None, kl_weight=args.kl_weight, ce_weight=args.ce_weight).settings
    stages = []  # (run name, student config, TrainConfig, record without the teacher's hash)
    for name in students:
        kind = "mamba2" if name.startswith("mamba2") else "hybrid"
        cfg = student_config(teacher_cfg, kind, attn_layers if kind == "hybrid" else ())
        init = "random" if name.endswith("random") else "attention"
        aligned = bool(align_steps) and init == "attention"
        if aligned:
            tc = _train_config(args.out, f"{name}_align", data, seq_len, preset["distill_train"], args.seed, 0,
                               align_steps).replace(weight_decay=0.0)
            stages.append((f"{name}_align", cfg, tc, {"stage": "align", "init": init}))
        tc = _train_config(args.out, name, data, seq_len, preset["distill_train"], args.seed,
                           preset["eval_batches"], args.steps)
        stages.append((name, cfg, tc, {**kd_settings, "init": init,
                                       "aligned_before": f"{name}_align" if aligned else None}))
    if reuse:  # every run checked before anything trains (the teacher's hash: once it is known)
        if not args.teacher:
            reuse_state(teacher_tc.out_dir, teacher_cfg, teacher_tc, {})
        for name, cfg, tc, record in stages:
            reuse_state(tc.out_dir, cfg, tc, record, check_teacher_sha=False)
    if not args.teacher:
        _, teacher_reused = train_stage("the teacher", teacher_cfg, teacher_tc, {}, reuse=reuse)
        _, _, teacher_params = load_run(teacher_tc.out_dir)
        reuse = reuse and teacher_reused  # a new (or continued) teacher: its students are trained again
    teacher = jf.build(teacher_cfg)
    teacher_sha = params_sha256(teacher_params)
    results["teacher_params_sha256"] = teacher_sha
    models = {"teacher": (teacher_cfg, teacher, teacher_params)}

    def heldout(n, seed):  # problems the models never trained on (the loader trains on the others)
        return draw_split(lambda m, s: arithmetic(m, digits, seed=s), n, seed, "heldout",
                          arithmetic_prompt_length(digits))

    val_tokens, val_mask = heldout(VAL_SEQUENCES, 10_000 + args.seed)
    results["val_sequences"] = int(len(val_tokens))  # what kl_init / kl_aligned / kl_final average over
    results["students"] = {}
    records = {name: {**record, "teacher_sha256": teacher_sha} for name, _, _, record in stages}
    configs = {name: tc for name, _, tc, _ in stages}
    for name in students:
        cfg = student_config(teacher_cfg, "mamba2" if name.startswith("mamba2") else "hybrid",
                             attn_layers if not name.startswith("mamba2") else ())
        params0 = init_student(teacher_cfg, teacher_params, cfg, jax.random.PRNGKey(args.seed),
                               init=records[name]["init"])
        module = jf.build(cfg)
        kl0 = mean_kl(teacher, teacher_params, module, params0, val_tokens, val_mask)
        kl_aligned, aligned_reused = None, True
        if f"{name}_align" in records:  # stage 1: layer-wise alignment
            tc = configs[f"{name}_align"]
            _, aligned_reused = train_stage(
                f"{name} (layer-wise alignment)", cfg, tc, records[f"{name}_align"], reuse=reuse,
                step_fn=DistillStep(teacher_cfg, teacher_params, stage="align"), init_params=params0)
            _, _, params0 = load_run(tc.out_dir)
            kl_aligned = mean_kl(teacher, teacher_params, module, params0, val_tokens, val_mask)
        tc = configs[name]
        step = DistillStep(teacher_cfg, teacher_params, kl_weight=args.kl_weight, ce_weight=args.ce_weight)
        # a retrained / continued alignment: the distillation starts from other weights
        summary, _ = train_stage(f"{name} (distillation)", cfg, tc, records[name], reuse=reuse and aligned_reused,
                                 step_fn=step, init_params=params0)
        _, _, params = load_run(tc.out_dir)
        losses = [r["loss"] for r in read_metrics(tc.out_dir) if "loss" in r]
        results["students"][name] = {
            "run_dir": tc.out_dir, "attn_layers": list(cfg.attention_layers), "n_params": summary["n_params"],
            "kl_init": kl0, "align_steps": 0 if kl_aligned is None else align_steps, "kl_aligned": kl_aligned,
            "kl_final": mean_kl(teacher, teacher_params, module, params, val_tokens, val_mask),
            "distill_loss_first": losses[0], "distill_loss_last": losses[-1],
            "val_loss": summary["val_loss"]}
        models[name] = (cfg, module, params)
        save_progress(args.out, results)

    # 3-4. throughput and the fixed-time-budget curves
    test_tokens, _ = heldout(n_problems, 20_000 + args.seed)
    prompt_len = 2 * digits + 3
    prompts = test_tokens[:, :prompt_len]
    answers = [tuple(r) for r in test_tokens[:, -(digits + 2):-1].tolist()]
    new_tokens = test_tokens.shape[1] - prompt_len
    results["models"] = {}
    for name, (cfg, module, params) in models.items():
        row = {"n_params": int(sum(np.size(x) for x in jax.tree.leaves(params))), "throughput": [], "budget": []}
        for b in speed_batches:
            for length in speed_lengths:
                if length <= cfg.max_seq_len:
                    row["throughput"].append({"batch": b, "length": length,
                                              "tokens_per_s": throughput(module, params, b, length)})
        _, greedy, _ = sample_problems(module, params, prompts, answers, 1, new_tokens, digits, 0.0, args.seed)
        row["greedy_accuracy"] = greedy
        for k in samples:
            secs, cov, maj = sample_problems(module, params, prompts, answers, k, new_tokens, digits,
                                             temperature, args.seed)
            row["budget"].append({"k": k, "seconds_per_problem": secs / n_problems, "coverage": cov,
                                  "majority_accuracy": maj})
        results["models"][name] = row
        save_progress(args.out, results)
        print(f"[distill] {name}: greedy {greedy:.3f}, coverage@{samples[-1]} {row['budget'][-1]['coverage']:.3f}",
              file=sys.stderr, flush=True)
    return results


def plot(results: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, row in results["models"].items():
        # lines drawn in increasing x (--samples / --speed-batches may be given in any order)
        b = sorted(row["budget"], key=lambda p: p["seconds_per_problem"])
        t = [p["seconds_per_problem"] * 1e3 for p in b]
        axes[0].plot(t, [p["coverage"] for p in b], marker="o", label=name)
        axes[1].plot(t, [p["majority_accuracy"] for p in b], marker="o", label=name)
        tp = sorted((p for p in row["throughput"] if p["length"] == max(q["length"] for q in row["throughput"])),
                    key=lambda p: p["batch"])
        axes[2].plot([p["batch"] for p in tp], [p["tokens_per_s"] for p in tp], marker="o", label=name)
    axes[0].set(xlabel="generation time per problem (ms)", ylabel="coverage (any of k right)", xscale="log",
                title=f"{results['task']}, T={results['temperature']}")
    axes[1].set(xlabel="generation time per problem (ms)", ylabel="majority-vote accuracy", xscale="log")
    axes[2].set(xlabel="batch", ylabel="generated tokens/s", xscale="log", yscale="log",
                title="sampling throughput (longest length)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "coverage.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def main(argv=None) -> dict:
    ap = _parser()
    args = parse_experiment_args(ap, argv, check=_check_args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_results(out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    results = run(args, ap)
    results["plots"] = plot(results, out)
    write_results(out, **results, complete=True)
    print(json.dumps({name: {"greedy": round(r["greedy_accuracy"], 3), "k": [p["k"] for p in r["budget"]],
                             "coverage": [round(p["coverage"], 3) for p in r["budget"]],
                             "ms_per_problem": [round(p["seconds_per_problem"] * 1e3, 2) for p in r["budget"]]}
                      for name, r in results["models"].items()}, indent=1))
    return results


if __name__ == "__main__":
    main()
