"""README.md / BENCHMARKS.md stay true: cited files, tests and CLI flags exist; GPU statements
say they are not yet measured; the --reuse list and the quick-start commands match the code."""
import contextlib
import io
import re
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BENCHMARKS = (REPO / "BENCHMARKS.md").read_text()
DOCS = {"README.md": README, "BENCHMARKS.md": BENCHMARKS}


def _help(module: str) -> str:
    """``python -m experiments.MODULE --help`` run in this process (the parser's text)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_module(f"experiments.{module}", run_name="__main__", alter_sys=False)
    finally:
        sys.argv = argv
    assert "usage:" in out.getvalue(), module
    return out.getvalue()


def _commands():
    """(doc, module, flags) of every ``python -m experiments.X ...`` the docs show."""
    found = []
    for name, text in DOCS.items():
        for m in re.finditer(r"python -m experiments\.(\w+)([^`\n|;)]*)", text.replace("\\\n", " ")):
            if m.group(1) == "NAME":
                continue
            flags = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2))
            found.append((name, m.group(1), tuple(flags)))
    return found


def test_cited_test_files_and_test_names_exist():
    tests_src = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")}
    for name, text in DOCS.items():
        for ref in set(re.findall(r"tests/[\w./*\[\]:-]+", text)):
            path, _, test = ref.rstrip(".").partition("::")
            assert list(REPO.glob(path)), (name, ref)
            if test:
                func = test.split("[")[0]
                assert f"def {func}(" in (REPO / path).read_text(), (name, ref)
        for func in set(re.findall(r"`(test_\w+)`", text)):
            assert any(f"def {func}(" in src for src in tests_src.values()), (name, func)


def test_cited_repository_paths_exist():
    for name, text in DOCS.items():
        for ref in set(re.findall(r"`((?:jaxformers|pallas_kernels|experiments|scripts)/[\w./*-]*)`", text)):
            assert list(REPO.glob(ref.rstrip("/"))), (name, ref)


@pytest.mark.parametrize("module", sorted({m for _, m, _ in _commands()}))
def test_documented_experiment_commands_and_flags_exist(module):
    text = _help(module)
    for name, mod, flags in _commands():
        if mod == module:
            for flag in flags:
                assert re.search(re.escape(flag) + r"\b", text), (name, module, flag)


def test_reuse_list_names_every_experiment_that_takes_reuse():
    section = README.split("Paper experiments (`python -m experiments.NAME", 1)[1].split("\n## ", 1)[0]
    listed = re.search(r"`--reuse` \(([^;]*);", section).group(1).replace("\n", " ")
    listed = {x.strip() for x in listed.split(",")}
    for module in ("cotformer", "denseformer", "distill", "doge", "landmark_lm", "landmark_passkey",
                   "layer_parallel", "mamba", "quarot", "scfa_lm"):
        assert "--reuse" in _help(module), module
        assert module in listed, (module, listed)


def test_gpu_time_statements_say_not_yet_run():
    """The GPU has never been available: a line promising minutes on an H200 says it was not run."""
    for line in README.splitlines():
        if re.search(r"(minutes|min) on an H200", line):
            assert re.search(r"not yet run", line, re.I), line


def test_quick_start_export_has_a_llama_run_to_export():
    block = README.split("## Quick start", 1)[1].split("### Your own text", 1)[0]
    export = block.index("python -m experiments.export --run runs/llama-tiny")
    assert re.search(r"python -m experiments\.train --model llama\b", block[:export])


def test_benchmarks_cpu_gptq_layer_time_matches_the_default_spec_row():
    row = next(l for l in BENCHMARKS.splitlines() if l.startswith("| GPTQ W4, sequential groups, the authors' clipping grid"))
    seconds = float(row.split("|")[2].split("/")[0])
    quoted = re.search(r"CPU: (\d+) s a GPTQ W4 layer on 16 x 128 tokens with the default spec", BENCHMARKS)
    assert quoted and int(quoted.group(1)) == round(seconds)
