"""Stop 56: regression tests of my own fixes (carry-overs of stop 55's notes)."""
import shutil

from test_train_ux import TINY, base_run, env, loss_rows  # noqa: F401 - the module's fixtures

from experiments import train as train_cli


def test_init_from_and_resume_survive_a_deleted_source(env, base_run, capsys):
    """A fine-tuning job script passes ``--init-from SRC --resume`` on every start; once SRC is
    deleted the run (which holds its config, tokenizer and loss) is continued from its checkpoint
    (it was a FileNotFoundError reading SRC's config.json); another source is still refused."""
    src = env["root"] / "src_copy56"
    shutil.copytree(base_run, src)
    run = env["root"] / "ft56"
    flags = TINY[TINY.index("--batch-size"):] + ["--checkpoint-every", "1"]

    def command(source, *extra):
        return ["--init-from", str(source), "--data", env["corpus"], "--out", str(run)] + flags + list(extra)

    assert train_cli.main(command(src, "--steps", "2", "--resume")) == 0
    shutil.rmtree(src)
    capsys.readouterr()
    assert train_cli.main(command(src, "--steps", "3", "--resume")) == 0, capsys.readouterr().err
    assert [r[0] for r in loss_rows(run)] == [1, 2, 3]
    gone = env["root"] / "never_there56"
    assert train_cli.main(command(gone, "--steps", "4", "--resume")) == 2
    assert f"started with init_from={str(src)!r}" in capsys.readouterr().err

