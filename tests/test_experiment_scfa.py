"""Smoke tests of ``python -m experiments.scfa_lm`` (2 steps) and ``experiments.scfa_speed --quick``."""
import json

from experiments import scfa_lm, scfa_speed


def test_scfa_lm_experiment_writes_results(tmp_path):
    out = tmp_path / "lm"
    results = scfa_lm.main(["--preset", "tiny", "--out", str(out), "--steps", "2", "--eval-batches", "1",
                            "--only", "hash_nb4", "--no-kernel-check",
                            "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"].keys() == results["models"].keys() == {"hash_nb4_T128"}  # one model: CI time
    assert saved["complete"] is True  # written after every model with complete=False, then finished
    for row in saved["models"].values():
        for key in ("val_ppl", "step_time_s", "attention_tiles_per_step", "train_tokens"):
            assert row[key] is not None, key
        assert row["val_ppl"] > 1 and row["step_time_s"] > 0
        assert row["dense_attention_tiles_per_step"] == 2 * 8 * 4 * 36  # layers x batch x heads x (8*9/2)
    rows = saved["models"]
    assert rows["hash_nb4_T128"]["train_tokens"] == 2 * 8 * 128
    for name in ("hash_nb4_T128",):  # sparse: fewer tiles than dense causal
        assert 0 < rows[name]["tile_fraction"] < 1
        assert len(rows[name]["tiles_per_sparse_layer"]) == 2
    assert (out / "scfa_lm.png").stat().st_size > 1000


def test_scfa_speed_quick(tmp_path):
    scfa_speed.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {r["impl"]: r for r in saved["rows"]}
    assert {"flash", "hash_nb2", "hash_nb4", "qk_keep0.5"} <= rows.keys()
    for name in ("flash", "hash_nb2", "hash_nb4", "qk_keep0.5"):
        assert rows[name]["fwd_ms"] > 0 and rows[name]["fwd_bwd_ms"] > 0, rows[name]
    for name in ("hash_nb2", "hash_nb4", "qk_keep0.5"):
        assert 0 < rows[name]["tile_fraction"] <= 1
        assert rows[name]["speedup_vs_flash_fwd"] is not None
    assert (tmp_path / "speedup_vs_T.png").stat().st_size > 1000


def test_scfa_speed_block_must_be_a_kernel_tile(tmp_path, capsys):
    """``--block 48`` (not a power of two) is a usage error; it used to record a tile fraction
    of 1.25 next to the kernels' errors."""
    import pytest

    for block in ("48", "8"):
        with pytest.raises(SystemExit) as exc:
            scfa_speed.main(["--quick", "--block", block, "--out", str(tmp_path / block)])
        assert exc.value.code == 2
        assert "--block must be a power of two >= 16" in capsys.readouterr().err
        assert not (tmp_path / block).exists()


def test_scfa_lm_tile_counts_per_layer_and_under_scan():
    """Per-layer tile counts in model order, and under ``scan_layers`` too (the labels were lost
    in the scan: no sparse layer counted, tile_fraction 1.0)."""
    import jax
    import numpy as np

    import jaxformers as jf
    from jaxformers.models.scfa import attention_labels
    from pallas_kernels.sparse_attention import hash_tile_count

    small = dict(vocab_size=64, d_model=16, n_head=2, max_seq_len=64, sparse_impl="reference",
                 n_buckets=4, block_q=16, block_k=16)
    tok = jax.random.randint(jax.random.PRNGKey(0), (2, 64), 0, 64)
    dense_layer = 10 * 2 * 2  # causal 16-tiles at T=64 x batch x heads
    for kw in (dict(n_layer=3, scan_layers=True), dict(n_layer=3, sparse_layers=(0, 2))):
        cfg = jf.get_config("hash_sparse", "tiny", **small, **kw)
        params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(1), tok)
        tiles, dense, per_layer = scfa_lm.tile_counts(cfg, params, 2, 64, 0, 16)
        assert dense == 3 * dense_layer
        want = [int(hash_tile_count(ql, kl, block_q=16, block_k=16).sum())
                for ql, kl in attention_labels(jf.build(cfg), params, tok)]
        assert per_layer == want and len(want) == (3 if cfg.scan_layers else 2)
        assert all(0 < n < dense_layer for n in per_layer)
        assert tiles == sum(per_layer) + (3 - len(per_layer)) * dense_layer
        assert tiles / dense < 0.9, tiles / dense
        if not cfg.scan_layers:  # layer 2's count is the last entry (model order)
            inter = jf.build(cfg).apply({"params": params}, tok, mutable=["intermediates"])[1]
            last = inter["intermediates"]["blocks_2"]["attn"]
            assert per_layer[-1] == int(np.asarray(hash_tile_count(
                last["q_labels"][0], last["k_labels"][0], block_q=16, block_k=16)).sum())
