"""Multi-process training for real: several processes of ``experiments.train`` on one machine.

Every process gets 2 CPU devices (``--xla_force_host_platform_device_count=2``) and the
processes talk through ``jax.distributed`` on free loopback ports (gloo CPU collectives, jax's
default on CPU).  The launch is the one the README documents ("Training at scale"): the same
command on every process with ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` +
``JAX_PROCESS_ID``; the project's own variables, SLURM and Open MPI are simulated by their
variables.  Every subprocess runs under a timeout: a hang fails the test, it never blocks it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import with_fast_compile_flags
from corpora import word_corpus
from jaxformers.training.checkpoint import MANIFEST
from jaxformers.training.mesh import distributed_settings
from jaxformers.training.rundir import read_metrics

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LAUNCH_TIMEOUT = 300  # seconds for one launch (start-up, compile, a few dozen steps) before it counts as hung
HEARTBEAT = 10  # JAXFORMERS_HEARTBEAT_TIMEOUT of the run that loses a process (others: jax's 100 s)
STEPS = 80
# the variables a launch on this machine must not inherit (a CI runner inside SLURM, ...)
_FOREIGN = re.compile(r"^(SLURM_|OMPI_|PMIX_|TPU_|MEGASCALE_|JAX_COORDINATOR|JAX_NUM_PROCESSES$|JAX_PROCESS_ID$|"
                      r"COORDINATOR_ADDRESS$|NUM_PROCESSES$|PROCESS_ID$|JAXFORMERS_DISTRIBUTED$|XLA_FLAGS$)")

# Python-level writes of each process into the run directory, recorded by an audit hook that a
# sitecustomize module installs in every subprocess (the command itself stays the README's).
_AUDIT = '''
import os, sys
_log = os.environ.get("MH_AUDIT_LOG")
_root = os.environ.get("MH_AUDIT_ROOT")
if _log and _root:
    _root = os.path.realpath(_root)
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _record(kind, path):
        try:
            path = os.path.realpath(os.fsdecode(path))
        except Exception:
            return
        if path.startswith(_root + os.sep):
            with open(_log, "a") as f:
                f.write(kind + " " + os.path.relpath(path, _root) + "\\n")
    def _hook(event, args):
        if event == "open" and args and not isinstance(args[0], int):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (not mode and flags & _W):
                _record("write", args[0])
        elif event in ("os.rename", "os.replace"):
            _record(event, args[1])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            _record(event, args[0])
    sys.addaudithook(_hook)
'''

# Our files in a run directory: only process 0 may write them.
_OURS = re.compile(r"(^|/)(config\.json|metrics\.jsonl|summary\.json|loss\.png|tokenizer/.*|"
                   r"\.?[^/]*\.tmp-\d+|" + re.escape(MANIFEST) + r".*|checkpoints\.incomplete.*)$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_vars(launcher: str, port: int, pid: int, n: int) -> dict:
    """The variables process ``pid`` of ``n`` gets for each documented launch."""
    if launcher == "jax":
        return {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n),
                "JAX_PROCESS_ID": str(pid)}
    if launcher == "project":
        return {"COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "NUM_PROCESSES": str(n), "PROCESS_ID": str(pid)}
    if launcher == "slurm":  # what srun sets (the node list names this machine)
        return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": str(n),
                "SLURM_PROCID": str(pid), "SLURM_LOCALID": str(pid), "JAX_COORDINATOR_PORT": str(port)}
    if launcher == "ompi":  # what Open MPI 4's mpirun sets
        return {"OMPI_MCA_orte_hnp_uri": f"{4242 << 12}.0;tcp://127.0.0.1:1", "OMPI_COMM_WORLD_SIZE": str(n),
                "OMPI_COMM_WORLD_RANK": str(pid), "OMPI_COMM_WORLD_LOCAL_RANK": str(pid),
                "JAX_COORDINATOR_PORT": str(port)}
    raise ValueError(launcher)


class Launch:
    """``n`` processes of one command (``n=1``: a plain single-process run on ``devices`` devices).
    Output goes to files (a full pipe must never stall a process that its peers wait for)."""

    def __init__(self, env, args, *, n=2, devices=2, launcher="jax", name="run", audit_root=None,
                 extra_env=None):
        self.dir = Path(env["root"]) / "logs" / f"{name}-{time.time_ns()}"
        self.dir.mkdir(parents=True)
        port = _free_port()
        self.procs, self.files = [], []
        for pid in range(n):
            e = dict(env["base"], XLA_FLAGS=env["xla_flags"] + f" --xla_force_host_platform_device_count={devices}")
            if n > 1:
                e.update(launch_vars(launcher, port, pid, n))
            e.update(extra_env or {})
            if audit_root is not None:
                e.update(MH_AUDIT_LOG=str(self.dir / f"audit{pid}.txt"), MH_AUDIT_ROOT=str(audit_root))
            out, err = open(self.dir / f"out{pid}.txt", "w"), open(self.dir / f"err{pid}.txt", "w")
            self.files += [out, err]
            self.procs.append(subprocess.Popen([sys.executable, *args], cwd=str(REPO), env=e, stdout=out,
                                               stderr=err))

    def out(self, pid=0) -> str:
        return (self.dir / f"out{pid}.txt").read_text()

    def err(self, pid=0) -> str:
        return (self.dir / f"err{pid}.txt").read_text()

    def audit(self, pid) -> list:
        path = self.dir / f"audit{pid}.txt"
        return path.read_text().splitlines() if path.exists() else []

    def tails(self) -> str:
        return "\n".join(f"--- process {p} stderr:\n{self.err(p)[-2500:]}" for p in range(len(self.procs)))

    def wait(self, timeout=LAUNCH_TIMEOUT) -> list:
        """Return codes; kills everything and fails if a process is still running at ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"a process still ran after {timeout} s (hang)\n{self.tails()}")
        finally:
            for f in self.files:
                f.close()
        return [p.returncode for p in self.procs]

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()

    def check(self, timeout=LAUNCH_TIMEOUT):
        codes = self.wait(timeout)
        assert codes == [0] * len(codes), f"return codes {codes}\n{self.tails()}"


def wait_for(cond, launch, what, timeout=LAUNCH_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not cond():
        if any(p.poll() is not None for p in launch.procs):
            launch.kill()
            pytest.fail(f"a process ended before {what}\n{launch.tails()}")
        if time.monotonic() > deadline:
            launch.kill()
            pytest.fail(f"no {what} after {timeout} s\n{launch.tails()}")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    corpus = word_corpus(root / "corpus")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_AUDIT)
    base = {k: v for k, v in os.environ.items() if not _FOREIGN.match(k)}
    base.update(JAXFORMERS_CACHE=str(root / "cache"), JAX_COMPILATION_CACHE_DIR=str(root / "xla"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu",
                JAXFORMERS_INIT_TIMEOUT="120",
                PYTHONPATH=os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFORMERS_CACHE", str(root / "cache"))
        from jaxformers.data import open_data
        open_data(str(corpus), "byte")  # prepared once here, not by two processes at the same time
        yield {"root": root, "corpus": str(corpus), "base": base,
               # conftest's fast-compile flags (-O0 codegen halves compile time); every launch
               # shares them
               "xla_flags": with_fast_compile_flags("")}


def train_args(env, out, *extra, steps=STEPS, mesh="data=2,fsdp=2"):
    return ["-m", "experiments.train", "--model", "gpt", "--preset", "tiny", "--set", "d_model=32",
            "--set", "n_layer=1", "--set", "n_head=4", "--set", "max_seq_len=32", "--data", env["corpus"],
            "--steps", str(steps), "--batch-size", "8", "--seq-len", "32", "--lr", "3e-3",
            "--warmup-steps", "5", "--eval-every", "0", "--eval-batches", "2", "--log-every", "1",
            "--checkpoint-every", "20", "--mesh", mesh, "--out", str(out), "--quiet", *extra]


def summary_of(stdout: str) -> dict:
    """The JSON a CLI prints (gloo's C++ code prints connection notes to stdout too)."""
    start = re.search(r"^\{", stdout, re.M)
    assert start, stdout[-2000:]
    return json.loads(stdout[start.start():])


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def assert_same_losses(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def runs(env):
    """``data=2,fsdp=2``: one process with 4 devices, and two processes with 2 each (audited)."""
    root = env["root"]
    single = Launch(env, train_args(env, root / "single"), n=1, devices=4, name="single")
    single.check()
    multi_dir = root / "multi"
    multi = Launch(env, train_args(env, multi_dir), name="multi", audit_root=multi_dir)
    multi.check()
    return {"single": root / "single", "multi": multi_dir, "single_launch": single, "multi_launch": multi}


# ----------------------------------------------------------------------------- launch variables
def test_every_documented_launch_resolves():
    jax_style = distributed_settings({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                      "JAX_PROCESS_ID": "3"})
    assert jax_style == ("JAX_COORDINATOR_ADDRESS", {"coordinator_address": "10.0.0.1:1234",
                                                     "num_processes": 4, "process_id": 3})
    ours = distributed_settings({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "0",
                                 "JAXFORMERS_HEARTBEAT_TIMEOUT": "7", "JAXFORMERS_INIT_TIMEOUT": "30"})
    assert ours == ("COORDINATOR_ADDRESS", {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
                                            "heartbeat_timeout_seconds": 7, "initialization_timeout": 30})
    slurm = {k: v for k, v in launch_vars("slurm", 1234, 1, 2).items() if k != "JAX_COORDINATOR_PORT"}
    assert distributed_settings(slurm) == ("slurm", {})  # jax reads the SLURM variables itself
    assert distributed_settings(launch_vars("ompi", 1234, 1, 2)) == ("ompi", {})
    assert distributed_settings({"TPU_WORKER_HOSTNAMES": "a,b"}) == ("tpu", {})
    # SLURM with the address given: jax takes the process count and id from SLURM
    assert distributed_settings({**slurm, "JAX_COORDINATOR_ADDRESS": "n1:9"}) == (
        "JAX_COORDINATOR_ADDRESS", {"coordinator_address": "n1:9"})
    assert distributed_settings({}) is None
    assert distributed_settings({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None  # one task
    assert distributed_settings({**slurm, "JAXFORMERS_DISTRIBUTED": "0"}) is None
    assert distributed_settings({"JAXFORMERS_DISTRIBUTED": "1"}) == ("JAXFORMERS_DISTRIBUTED=1", {})


@pytest.mark.parametrize("env_vars, names", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, ["JAX_PROCESS_ID"]),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, ["JAX_COORDINATOR_ADDRESS"]),
    ({"COORDINATOR_ADDRESS": "h:1", "PROCESS_ID": "0"}, ["NUM_PROCESSES"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, ["JAX_NUM_PROCESSES"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     ["JAX_PROCESS_ID", "JAX_NUM_PROCESSES"]),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, ["JAX_COORDINATOR_ADDRESS"]),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"},  # sbatch without srun
     ["SLURM_STEP_NODELIST", "SLURM_LOCALID", "srun"]),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     ["OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS"]),
    ({"JAXFORMERS_HEARTBEAT_TIMEOUT": "soon", "JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAXFORMERS_HEARTBEAT_TIMEOUT"]),
    ({"JAXFORMERS_DISTRIBUTED": "yes"}, ["JAXFORMERS_DISTRIBUTED"]),
])
def test_half_configured_launch_names_the_variable(env_vars, names):
    with pytest.raises(ValueError) as info:
        distributed_settings(env_vars)
    for name in names:
        assert name in str(info.value)


def test_half_configured_cli_launch_fails_fast_with_the_variable(env, monkeypatch, capsys):
    """The issue's report: the ``JAX_*`` launch without a process count/id used to end in jax's
    'Number of processes must be defined'; each half now names what is missing (exit code 2)."""
    from experiments import train as train_cli

    for k in list(os.environ):
        if _FOREIGN.match(k) and k != "XLA_FLAGS":
            monkeypatch.delenv(k)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    code = train_cli.main(train_args(env, env["root"] / "half", steps=2)[2:] + ["--warmup-steps", "1",
                                                                                  "--no-compile-cache"])
    assert code == 2
    assert "JAX_NUM_PROCESSES" in capsys.readouterr().err
    assert not (env["root"] / "half").exists()


# ----------------------------------------------------------------------------- rows per process
_ROWS = textwrap.dedent('''
    import json, os, sys, types
    import numpy as np
    from jaxformers.training import mesh as mesh_lib
    from jaxformers.training.trainer import train_loader
    from jaxformers.data import open_data
    assert mesh_lib.maybe_initialize_distributed()
    import jax
    from jax.experimental import multihost_utils
    source = open_data(sys.argv[1], "byte")
    out = {"index": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count(),
           "meshes": {}}
    for spec in sys.argv[3:]:
        mesh = mesh_lib.make_mesh(spec)
        loader = train_loader(source, types.SimpleNamespace(batch_size=8, seq_len=32, seed=0), mesh)
        local = loader.batch_dict_at(3)["tokens"]
        placed = jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh), local, (8, 33))
        seen = multihost_utils.process_allgather(placed, tiled=True)
        out["meshes"][spec] = {"local": local.tolist(), "seen": np.asarray(seen).tolist()}
    with open(sys.argv[2] + "." + str(jax.process_index()), "w") as f:
        json.dump(out, f)
''')
MESHES = {"data=2,fsdp=2": 2, "data=2,tensor=2": 2, "fsdp=2,tensor=2": 2, "tensor=4": 1}  # -> row blocks


@pytest.mark.parametrize("launcher", ["project", "slurm", "ompi"])
def test_each_process_reads_only_its_rows(env, launcher):
    """Launched by the project's variables, by SLURM's and by Open MPI's: the processes see 4
    devices in all; with the batch split over processes their rows are disjoint and make up the
    single-process batch, with the batch replicated (``tensor=4``) both read all of it; the
    global array the model sees is the single-process batch either way."""
    from jaxformers.data import TokenLoader, open_data

    dump = env["root"] / f"rows-{launcher}"
    meshes = MESHES if launcher == "project" else {"data=2,fsdp=2": 2}  # the launch itself is the point
    launch = Launch(env, ["-c", _ROWS, env["corpus"], str(dump), *meshes], launcher=launcher, name=launcher)
    launch.check()
    got = [json.loads(Path(f"{dump}.{p}").read_text()) for p in range(2)]
    assert [(g["index"], g["count"], g["devices"]) for g in got] == [(0, 2, 4), (1, 2, 4)]
    full = TokenLoader(open_data(env["corpus"], "byte").train_tokens, 8, 32, seed=0, process_index=0,
                       process_count=1).batch_at(3)
    for spec, blocks in meshes.items():
        local = [np.asarray(g["meshes"][spec]["local"]) for g in got]
        for g in got:
            np.testing.assert_array_equal(g["meshes"][spec]["seen"], full)
        if blocks == 2:
            assert local[0].shape == local[1].shape == (4, 33)
            np.testing.assert_array_equal(np.concatenate(local), full)  # disjoint halves, in order
        else:
            for rows in local:
                np.testing.assert_array_equal(rows, full)


# ----------------------------------------------------------------------------- training
def test_two_processes_train_like_one(runs):
    """``data=2,fsdp=2`` over 2 processes x 2 devices = one process x 4 devices, step by step."""
    want, got = losses(runs["single"]), losses(runs["multi"])
    assert len(got) == STEPS
    assert_same_losses(got, want)
    single = summary_of(runs["single_launch"].out())
    multi = summary_of(runs["multi_launch"].out(0))
    assert not re.search(r"^\{", runs["multi_launch"].out(1), re.M)  # one summary, from process 0
    assert multi["n_devices"] == 4 and multi["finished"]
    assert multi["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    # the launch sets JAX_COMPILATION_CACHE_DIR: several processes on CPU run without it (a hang on
    # jax 0.12.1 once one of them loads a program from it; the sigterm test below relaunches)
    assert "persistent compilation cache" in runs["multi_launch"].err(0)
    assert "persistent compilation cache" not in runs["multi_launch"].err(1)


def test_compile_cache_off_only_for_several_processes_on_cpu(monkeypatch):
    import jax
    from jaxformers.training import mesh
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
    jax.config.update("jax_compilation_cache_dir", "/nonexistent/xla")
    jax.config.update("jax_enable_compilation_cache", True)
    try:
        assert not mesh._no_compile_cache_on_cpu()  # one process: kept
        assert jax.config.jax_enable_compilation_cache
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        assert not mesh._no_compile_cache_on_cpu()  # GPUs: kept
        monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
        assert mesh._no_compile_cache_on_cpu()
        assert not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_enable_compilation_cache", saved[1])


def test_only_process_zero_writes_run_files(runs):
    run_dir, launch = runs["multi"], runs["multi_launch"]
    theirs = [line for line in launch.audit(1) if _OURS.search(line.split(" ", 1)[1])]
    assert theirs == [], theirs
    ours = " ".join(launch.audit(0))
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png", MANIFEST):
        assert name in ours  # the audit sees process 0 write each of them
    assert (run_dir / "loss.png").is_file() and json.loads((run_dir / "summary.json").read_text())["finished"]
    manifests = sorted(int(p.parent.name) for p in (run_dir / "checkpoints").glob(f"*/{MANIFEST}"))
    assert manifests == [STEPS - 20, STEPS]
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))  # once each


def test_checkpoint_of_two_processes_restores_in_one_and_in_two(env, runs):
    summary = json.loads((runs["multi"] / "summary.json").read_text())
    one = Launch(env, ["-m", "experiments.evaluate", "--run", str(runs["multi"])], n=1, devices=4,
                 name="eval1")
    one.check()
    # the whole split (--max-batches 0): its short last batch is split over the processes too
    # (7 windows: process 0 holds 4, process 1 3), so two processes score what one process does
    two = Launch(env, ["-m", "experiments.evaluate", "--run", str(runs["multi"]), "--mesh", "fsdp=4",
                       "--max-batches", "0"], name="eval2")
    two.check()
    assert not re.search(r"^\{", two.out(1), re.M)  # one report, from process 0
    assert summary_of(one.out(0))["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    from jaxformers.training import evaluate
    whole = evaluate(str(runs["multi"]), max_batches=None)
    assert whole["val_tokens"] % (8 * 32) != 0  # there is a short last batch
    result = summary_of(two.out(0))
    assert result["val_tokens"] == whole["val_tokens"]
    assert result["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    # the run's 16 evaluation rows read in batches of 12 (6 per process): the second batch's rows
    # past the 16th weigh 0 on process 0 (4 of its 6 kept) and on process 1 (none kept)
    odd = Launch(env, ["-m", "experiments.evaluate", "--run", str(runs["multi"]), "--mesh", "fsdp=4",
                       "--batch-size", "12"], name="eval3")
    odd.check()
    result = summary_of(odd.out(0))
    assert result["val_tokens"] == 16 * 32
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)


def test_tensor_axis_across_processes(env):
    """``tensor=4`` over 2 processes: tensor parallelism spans the processes, every process
    reads the whole batch; the losses are those of one process with 4 devices."""
    root = env["root"]
    Launch(env, train_args(env, root / "tp1", steps=6, mesh="tensor=4"), n=1, devices=4, name="tp1").check()
    Launch(env, train_args(env, root / "tp2", steps=6, mesh="tensor=4"), name="tp2").check()
    assert_same_losses(losses(root / "tp2"), losses(root / "tp1"))


# process 1 receives SIGTERM while it checkpoints the last step (read by no step's vote)
_LATE_SIGNAL = """
import os, signal, sys
import jax
from jaxformers.training import checkpoint
save = checkpoint.Checkpointer.save
def late(self, step, *a, **k):
    out = save(self, step, *a, **k)
    if step == int(os.environ["MH_LAST_STEP"]) and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return out
checkpoint.Checkpointer.save = late
from experiments.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_sigkill_and_resume_on_two_processes(env, runs):
    """SIGTERM to both processes: they agree on the step, checkpoint it once and exit 143, as one
    process does.  ``--resume``; SIGKILL one process mid-run: the other stops within the heartbeat
    timeout with jax's message, no hang.  ``--resume`` again: the run ends on the loss curve of the
    uninterrupted run, and a SIGTERM that reaches one process during the last step's checkpoint
    (``_LATE_SIGNAL``) leaves the run finished and is reported by both processes (exit 143), so a
    job script does not go on."""
    out = env["root"] / "interrupted"
    args = train_args(env, out)

    # 1. preemption of the whole job
    first = Launch(env, args, name="sigterm")
    wait_for(lambda: bool(losses(out)), first, "training step")
    for proc in first.procs:
        proc.send_signal(signal.SIGTERM)
    codes = first.wait()
    assert codes == [128 + signal.SIGTERM] * 2, first.tails()
    summary = summary_of(first.out(0))
    stopped = summary["final_step"]
    assert summary["stopped_by_signal"] == signal.SIGTERM and not summary["finished"] and 0 < stopped < STEPS
    saved = sorted(int(p.parent.name) for p in (out / "checkpoints").glob(f"*/{MANIFEST}"))
    assert saved[-1] == stopped and max(s for s, _ in losses(out)) == stopped

    # 2. one process killed while training
    second = Launch(env, args + ["--resume"], name="sigkill",
                    extra_env={"JAXFORMERS_HEARTBEAT_TIMEOUT": str(HEARTBEAT)})
    wait_for(lambda: max([s for s, _ in losses(out)], default=0) >= stopped + 25, second, "progress after resume")
    second.procs[1].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    codes = second.wait(timeout=HEARTBEAT + 120)  # fails as a hang otherwise
    waited = time.monotonic() - t_kill
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0, second.tails()
    err = second.err(0)
    assert "another task died" in err and "stopped sending heartbeats" in err, second.tails()
    assert f"process 0 of 2: if another process dies, this one stops once the JAX distributed service " \
        f"has missed its heartbeats for {HEARTBEAT} s (JAXFORMERS_HEARTBEAT_TIMEOUT)" in err  # said up front
    assert max(s for s, _ in losses(out)) < STEPS, "the run finished before the kill"
    print(f"survivor stopped {waited:.1f} s after the kill")

    # 3. resume on two processes: same curve as the uninterrupted run; process 1 receives SIGTERM
    # while it checkpoints the last step (read by no step's vote): the run is finished, and both
    # processes report the signal
    third = Launch(env, ["-c", _LATE_SIGNAL, *args[2:], "--resume"], name="resume",
                   extra_env={"MH_LAST_STEP": str(STEPS)})
    codes = third.wait()
    assert codes == [128 + signal.SIGTERM] * 2, third.tails()
    summary = summary_of(third.out(0))
    assert summary["finished"] and summary["resumed_from"] >= stopped
    assert summary["final_step"] == STEPS and summary["stopped_by_signal"] == signal.SIGTERM
    assert_same_losses(losses(out), losses(runs["multi"]))
    assert summary["train_loss"] == pytest.approx(summary_of(runs["multi_launch"].out(0))["train_loss"], rel=1e-5)


def test_readme_documents_the_launch_the_tests_use():
    section = README.read_text().split("## Training at scale", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, re.S)
    one_machine = next(b for b in blocks if "xla_force_host_platform_device_count=2" in b)
    for name in launch_vars("jax", 0, 0, 2):
        assert name in one_machine
    assert "python -m experiments.train" in one_machine and "--mesh data=2,fsdp=2" in one_machine
    for name in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "srun", "SLURM_NTASKS", "mpirun",
                 "JAXFORMERS_HEARTBEAT_TIMEOUT", "--resume", "--worker=all"):
        assert name in section, name
