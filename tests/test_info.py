"""experiments.info: preset table with params and FLOPs/token."""
import pytest

from experiments import info


def test_info_table_lists_presets(capsys):
    rows = info.main(["--model", "gpt"])
    out = capsys.readouterr().out
    assert [r["preset"] for r in rows] == ["tiny", "small", "medium"]
    assert "123.6M" in out  # gpt small ~124M
    small = rows[1]
    # tied embeddings: 6N + 12 L H Dh T
    assert small["flops_per_token"] == 6 * small["params"] + 12 * 12 * 768 * 1024


def test_info_unknown_model_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        info.main(["--model", "nope"])
    assert e.value.code == 2
    assert "unknown model" in capsys.readouterr().err
