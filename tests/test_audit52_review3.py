"""Review checks of stop 52's strided evaluation, ``-1`` meshes, kv-head constraints and capped
domain sources: the cases the first tests left out (several processes, padded rows on a mesh,
a broken file after the cap)."""
import numpy as np
import pytest

from multidevice import run_on_devices


@pytest.mark.parametrize("n_tokens,seq_len,stride,batch,procs,max_windows", [
    (257, 8, 3, 4, 2, None), (101, 8, 8, 4, 4, None), (400, 16, 5, 6, 3, 7), (33, 8, 1, 2, 2, None)])
def test_strided_batches_split_over_processes_score_every_token_once(n_tokens, seq_len, stride, batch, procs,
                                                                     max_windows):
    """Every process gets its block of each strided batch (possibly empty in the short last one):
    together they hold the one-process batches' rows and masks, so each token is scored once."""
    from jaxformers.data.loader import strided_eval_batches

    tokens = np.arange(n_tokens, dtype=np.int32)
    one = list(strided_eval_batches(tokens, batch, seq_len, stride, max_windows=max_windows))
    split = [list(strided_eval_batches(tokens, batch, seq_len, stride, max_windows=max_windows,
                                       process_index=p, process_count=procs)) for p in range(procs)]
    assert all(len(s) == len(one) for s in split)  # every process runs as many batches
    counts = np.zeros(n_tokens, np.int64)
    for i, ref in enumerate(one):
        for key in ("tokens", "loss_mask"):
            np.testing.assert_array_equal(np.concatenate([s[i][key] for s in split]), ref[key])
        for row, mask in zip(ref["tokens"], ref["loss_mask"]):
            counts[row[1:][mask[1:] > 0]] += 1
    n = (n_tokens - 1) // seq_len if max_windows is None else min((n_tokens - 1) // seq_len, max_windows)
    assert counts[0] == 0 and (counts[1:n * seq_len + 1] == 1).all() and (counts[n * seq_len + 1:] == 0).all()


MESH_SCRIPT = '''
import json
import jax, numpy as np
import jaxformers as jf
from jaxformers.training import evaluate
cfg = jf.get_config("llama", "tiny", n_layer=2, n_head=4, n_kv_head=2, vocab_size=64, max_seq_len=32)
params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
tokens = (np.arange(300) * 7 % 61).astype(np.int32)
out = {}
for mesh in [None, "tensor=4", "data=-1,tensor=2"]:
    for stride in (None, 12):
        r = evaluate((cfg, params), tokens, batch_size=3, seq_len=32, max_batches=None, mesh=mesh,
                     stride=stride)
        out[f"{mesh}/{stride}"] = [r["val_loss"], r["val_tokens"]]
print("RESULT" + json.dumps(out))
'''


def test_strided_evaluation_on_meshes_equals_the_data_mesh():
    """batch_size 3 on data=4 / data=2 pads a row (weight 0); 2 kv heads on tensor=4 are kept whole:
    the strided loss is the same on every mesh, over the same tokens as without a stride."""
    out = run_on_devices(MESH_SCRIPT, n=4)
    for stride in ("None", "12"):
        ref = out[f"None/{stride}"]
        for mesh in ("tensor=4", "data=-1,tensor=2"):
            got = out[f"{mesh}/{stride}"]
            assert got[1] == ref[1] and got[0] == pytest.approx(ref[0], rel=1e-5)
    assert out["None/12"][1] == out["None/None"][1] == 9 * 32
    assert out["None/12"][0] != out["None/None"][0]


def test_capped_domain_source_stops_before_a_broken_file(tmp_path):
    """A first document longer than max_bytes is cut and ends the read: a broken file after it is
    never opened; without a cap (0) it is read and named."""
    from jaxformers.data.domains import load_domain_docs

    (tmp_path / "a.txt").write_text("x" * 500)
    (tmp_path / "b.jsonl").write_text("{broken\n")
    assert load_domain_docs("d", str(tmp_path), max_bytes=100) == ["x" * 100]
    assert load_domain_docs("d", str(tmp_path), max_bytes=500) == ["x" * 500]
    for cap in (501, 0):
        with pytest.raises(ValueError, match="b.jsonl"):
            load_domain_docs("d", str(tmp_path), max_bytes=cap)
