"""Review of the Qwen import/export and the HF export writer (hf_write): regressions found.

* An export into an existing folder that is a mount point (a container's volume, ``--out /out``)
  or a bind mount was staged in its parent -- another mount -- and every rename into the folder
  failed with EXDEV ("Invalid cross-device link"); before the staged writer it worked.
* ``max_shard_size="infGB"`` (or ``"1e999KB"``) escaped as an ``OverflowError`` instead of the
  ``ValueError`` naming ``max_shard_size`` (a traceback from ``experiments.export``)."""
import errno
import json
import os

import numpy as np
import pytest

pytest.importorskip("safetensors")

import jaxformers as jf  # noqa: E402
from jaxformers.convert import from_hf, to_hf  # noqa: E402
from test_audit52_export import _assert_tree_equal, _export, _fake_run, _perturbed  # noqa: E402

pytestmark = pytest.mark.hf


def _fake_mount(monkeypatch, mount):
    """Make ``mount`` behave as a bind mount of its own file system (the same ``st_dev``, as
    ``mount --bind`` gives): renames between it and the rest fail with EXDEV, as the kernel's do."""
    mount = os.path.realpath(mount)

    def inside(path):
        path = os.path.realpath(path)
        return path == mount or path.startswith(mount + os.sep)

    for name in ("replace", "rename"):
        def fake(src, dst, _real=getattr(os, name)):
            if inside(src) != inside(dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link", src, None, dst)
            return _real(src, dst)
        monkeypatch.setattr(os, name, fake)


def test_an_export_into_a_mount_point_is_staged_on_its_file_system(tmp_path, monkeypatch, capsys):
    config = jf.get_config("llama", "tiny", vocab_size=257, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                           n_layer=2, qkv_bias=True)
    params = _perturbed(config)
    out = tmp_path / "volume"
    out.mkdir()
    _fake_mount(monkeypatch, out)
    to_hf(config, params, str(out))  # was: OSError EXDEV on the first rename
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["volume"]  # nothing staged beside it
    _, back = from_hf(str(out))
    _assert_tree_equal(back, params)
    # the CLI over it: sharded bf16, then one float32 file removing the shards; no staging folder left
    run = _fake_run(tmp_path, monkeypatch, config, params)
    capsys.readouterr()
    assert _export(run, out, "--force", "--dtype", "bfloat16", "--max-shard-size", "20KB") == 0, \
        capsys.readouterr().err
    assert "model.safetensors" in json.loads(capsys.readouterr().out)["removed"]
    assert _export(run, out, "--force") == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["run", "volume"]
    _, back = from_hf(str(out))
    _assert_tree_equal(back, params)


def test_an_export_into_a_missing_folder_is_still_one_rename_from_beside_it(tmp_path, monkeypatch):
    renames = []
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda s, d: renames.append((s, d)) or real(s, d))
    config = jf.get_config("llama", "tiny", vocab_size=64, d_model=32, n_head=4, n_kv_head=1, d_ff=48,
                           n_layer=1)
    to_hf(config, _perturbed(config), str(tmp_path / "new"))
    assert [os.path.dirname(s) for s, d in renames] == [str(tmp_path)] and renames[0][1].endswith("new")
    # over it: staged beside it still (its parent renames into it), nothing left behind
    renames.clear()
    to_hf(config, _perturbed(config, seed=3), str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path)) == ["new"] and sorted(os.listdir(tmp_path / "new")) == [
        "config.json", "model.safetensors"]


@pytest.mark.parametrize("size", ["infGB", "-infGB", "nanGB", "1e999KB"])
def test_a_max_shard_size_that_overflows_is_a_value_error(size, tmp_path, monkeypatch, capsys):
    from jaxformers.convert.hf_write import parse_size

    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)  # was: OverflowError for inf / 1e999
    config = jf.get_config("llama", "tiny", vocab_size=257, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                           n_layer=1)
    run = _fake_run(tmp_path, monkeypatch, config, _perturbed(config))
    assert _export(run, tmp_path / "hf", f"--max-shard-size={size}") == 2
    assert "max_shard_size" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    np.testing.assert_equal(sorted(os.listdir(tmp_path)), ["run"])


def test_an_empty_output_path_is_refused_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = jf.get_config("llama", "tiny", vocab_size=64, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                           n_layer=1)
    (tmp_path / "model.safetensors.index.json").write_text("{}")  # someone else's files
    with pytest.raises(ValueError, match="empty path"):
        to_hf(config, _perturbed(config), "")  # was: written into (and stale files removed from) the cwd
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors.index.json"]
    to_hf(config, _perturbed(config), ".")  # the current folder, asked for
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
