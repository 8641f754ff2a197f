"""Audit 48 (lead): regression tests for the fixes made outside the helpers' scopes."""
import json
import struct

import numpy as np
import pytest

from jaxformers.convert.hf_io import read_header, read_safetensors


def _safetensors(path, entry, data=b"\0" * 16):
    header = json.dumps({"w": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def test_read_header_accepts_a_well_formed_entry(tmp_path):
    path = _safetensors(tmp_path / "ok.safetensors", {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]})
    header, start = read_header(path)
    assert header["w"]["shape"] == [2, 2] and start > 8
    pytest.importorskip("safetensors")
    np.testing.assert_array_equal(read_safetensors(path)["w"], np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]},   # was a bare TypeError
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [0.0, 16.0]},   # was accepted, then seek(float)
    {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]},     # was read as shape [2, 2]
    {"dtype": "F32", "shape": ["2", 2], "data_offsets": [0, 16]},     # was read as shape [2, 2]
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [False, 16]},   # a bool is not an offset
])
def test_read_header_refuses_non_integer_shapes_and_offsets(tmp_path, entry):
    path = _safetensors(tmp_path / "bad.safetensors", entry)
    with pytest.raises(ValueError, match="'w'.*non-negative integers"):
        read_header(path)


# ----------------------------------------------------------------------------- kernel_report
def _fake_kernel_report(monkeypatch, lowerings, compile_fails=()):
    import types

    from experiments import kernel_report as kr

    case = kr.Case(fn=None, args=(), tpu_vmem=lambda: {})
    labels = [f"cfg{i}" for i in range(len(lowerings))]
    monkeypatch.setattr(kr, "cases", lambda preset, families: [("ssd", lab, lambda: case) for lab in labels])
    monkeypatch.setattr(kr, "tpu_columns", lambda c: {})
    it = iter(lowerings)

    def lower(fn, *a, arch):
        out = next(it)
        if isinstance(out, Exception):
            raise out
        return [types.SimpleNamespace(name=n, ttir=t) for n, t in out]

    def compile_report(call, arch):
        if call.name in compile_fails:
            raise RuntimeError(f"ptxas: {call.name} needs too many registers\nmore")
        return {"name": call.name, "arch": f"sm_{arch}", "triton_version": "x", "num_warps": 4,
                "registers": 100, "stack_bytes": 0, "local_bytes": 0, "shared_bytes": 1024, "fits": True,
                "wgmma": 1, "mma_sync": 0, "ctas_per_sm": 2}

    monkeypatch.setattr(kr, "triton_calls", lower)
    monkeypatch.setattr(kr, "compile_report", compile_report)
    return kr


def test_kernel_report_records_a_failing_lowering_or_compile_and_goes_on(tmp_path, monkeypatch):
    """One configuration's lowering error (or one kernel's compile error) used to end the whole
    sweep with a traceback and no rows for the configurations after it."""
    kr = _fake_kernel_report(monkeypatch, [ValueError("tile too big"), [("a", "ir"), ("bad", "ir")], [("c", "ir")]],
                             compile_fails=("bad",))
    with pytest.raises(SystemExit, match="2 kernel configuration"):
        kr.main(["--families", "ssd", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["name"], r["config"]) for r in res["rows"]] == [("a", "cfg1"), ("c", "cfg2")]
    assert res["errors"] == [
        {"family": "ssd", "config": "cfg0", "kernel": None, "stage": "lower", "error": "ValueError: tile too big"},
        {"family": "ssd", "config": "cfg1", "kernel": "bad", "stage": "compile",
         "error": "RuntimeError: ptxas: bad needs too many registers"}]
    assert res["complete"] is True and (tmp_path / "kernel_report.png").stat().st_size > 0


def test_kernel_report_run_without_an_errors_list_raises(monkeypatch):
    kr = _fake_kernel_report(monkeypatch, [ValueError("tile too big")])
    with pytest.raises(ValueError, match="tile too big"):
        kr.run("quick", 90, ("ssd",))


@pytest.mark.parametrize("error", [FileNotFoundError("cuobjdump"), "setup"])
def test_kernel_report_stops_at_once_on_a_broken_setup(tmp_path, monkeypatch, error):
    """A missing triton / cuobjdump fails every configuration alike: no sweep of N identical errors."""
    from pallas_kernels.triton_inspect import SetupError

    error = SetupError("compile_report needs the `triton` package") if error == "setup" else error
    kr = _fake_kernel_report(monkeypatch, [[("a", "ir")], [("b", "ir")]])
    monkeypatch.setattr(kr, "compile_report", lambda call, arch: (_ for _ in ()).throw(error))
    errors = []
    with pytest.raises(type(error)):
        kr.run("quick", 90, ("ssd",), errors=errors)
    assert errors == []


def test_kernel_report_identical_launches_give_one_row(tmp_path, monkeypatch):
    """The Hadamard transform's gradient launches the forward kernel again: two identical rows."""
    kr = _fake_kernel_report(monkeypatch, [[("h", "ir"), ("h", "ir"), ("h", "other ir")]])
    kr.main(["--families", "ssd", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["name"], r["launches"]) for r in rows] == [("h", 2), ("h", 1)]


# ----------------------------------------------------------------------------- DomainLoader weights
@pytest.mark.parametrize("weights", [["0.5", "0.5"], [True, False], [0.5, None]])
def test_domain_loader_refuses_weights_that_are_not_numbers(weights):
    from jaxformers.data.domains import Domain, DomainLoader

    doms = [Domain(f"d{i}", np.arange(64, dtype=np.int32), np.arange(16, dtype=np.int32)) for i in range(2)]
    with pytest.raises(ValueError, match="weights must be 2 finite non-negative numbers"):
        DomainLoader(doms, weights, 4, 8, process_index=0, process_count=1)
    import jax.numpy as jnp

    for ok in (np.array([1, 3]), jnp.asarray([1, 3], jnp.bfloat16), np.array([0.25, 0.75], np.float16)):
        loader = DomainLoader(doms, ok, 4, 8, process_index=0, process_count=1)  # numbers of any dtype
        np.testing.assert_allclose(loader.weights, [0.25, 0.75])


# ----------------------------------------------------------------------------- associative_recall
def test_associative_recall_at_a_huge_vocabulary_draws_distinct_keys_without_a_dense_array():
    """vocab 2**30: the old draw allocated [n, ~5e8] floats (and their argsort), i.e. 16 GB here."""
    import tracemalloc

    from jaxformers.data.synthetic import N_SPECIAL, associative_recall

    vocab, n, pairs = 2 ** 30, 4, 50
    tracemalloc.start()
    tokens, mask = associative_recall(n, pairs, vocab, seed=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 ** 24, peak
    n_keys = (vocab - N_SPECIAL) // 2
    keys, vals = tokens[:, 1:1 + 2 * pairs:2], tokens[:, 2:2 + 2 * pairs:2]
    assert all(len(set(row)) == pairs for row in keys.tolist())
    assert keys.min() >= N_SPECIAL and keys.max() < N_SPECIAL + n_keys
    assert vals.min() >= N_SPECIAL + n_keys and vals.max() < vocab
    rows = np.arange(n)
    q = np.array([list(keys[r]).index(tokens[r, -2]) for r in rows])  # the query is one of the keys
    np.testing.assert_array_equal(tokens[:, -1], vals[rows, q])
    assert mask.sum() == n and (mask[:, -1] == 1).all()
    np.testing.assert_array_equal(associative_recall(n, pairs, vocab, seed=3)[0], tokens)  # deterministic


@pytest.mark.parametrize("chunk", [None, 64, 1])  # one chunk; 2 rows a chunk; 1 row a chunk
def test_associative_recall_keeps_its_stream_when_drawn_in_chunks(monkeypatch, chunk):
    """The keys' draw, in chunks of rows, is the original single [n, n_keys] draw (recorded
    results stay reproducible)."""
    from jaxformers.data import synthetic
    from jaxformers.data.synthetic import N_SPECIAL, _rng, associative_recall

    if chunk is not None:
        monkeypatch.setattr(synthetic, "_DENSE_KEY_DRAW", max(chunk, 30))
    n, pairs, vocab = 9, 5, 64
    tokens, _ = associative_recall(n, pairs, vocab, seed=1)
    rng = _rng("associative_recall", 1)
    keys = np.argsort(rng.random((n, (vocab - N_SPECIAL) // 2)), axis=1)[:, :pairs] + N_SPECIAL
    vals = rng.integers(0, vocab - N_SPECIAL - (vocab - N_SPECIAL) // 2, size=(n, pairs), dtype=np.int32)
    np.testing.assert_array_equal(tokens[:, 1:1 + 2 * pairs:2], keys)
    np.testing.assert_array_equal(tokens[:, 2:2 + 2 * pairs:2] - N_SPECIAL - (vocab - N_SPECIAL) // 2, vals)


# ----------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("shape", [(4, 0), (0, 4)])
def test_weight_quantizers_refuse_an_empty_weight(shape):
    """A weight without output columns was a ZeroDivisionError (RTN) or numpy's reshape error
    (GPTQ); without input rows, a groupsize error about ``None``."""
    from jaxformers.quant.quantizers import gptq_weight, rtn_weight

    w = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"w must be .*in, out >= 1"):
        rtn_weight(w, 4)
    with pytest.raises(ValueError, match=r"w must be .*in, out >= 1"):
        gptq_weight(w, np.eye(shape[0], dtype=np.float32), 4)


# ----------------------------------------------------------------------------- MFU
@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, peak):
    import types

    from jaxformers.training.metrics import peak_flops

    assert peak_flops(types.SimpleNamespace(device_kind=kind)) == peak


def test_mfu_divides_by_the_peak_of_every_device():
    import types

    from jaxformers.training.metrics import mfu

    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    assert mfu(6e9, 1e5, n_devices=4, device=h100) == pytest.approx(6e14 / (4 * 989e12))
    assert mfu(6e9, 1e5, n_devices=1, device=h100) == pytest.approx(6e14 / 989e12)
    assert mfu(6e9, None, n_devices=1, device=h100) is None
    assert mfu(6e9, 1e5, device=types.SimpleNamespace(device_kind="cpu")) is None


def test_bench_quantize_rss_is_none_not_nan_without_proc(monkeypatch):
    """``results.json`` writes null for a number it does not have (a NaN means a computed NaN)."""
    import builtins

    from experiments import bench_quantize

    assert bench_quantize._rss_gb() > 0  # Linux: /proc/self/status
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert bench_quantize._rss_gb() is None
