"""README.md stays true, mechanically (audit 55): the defaults its prose states, the Models
table's presets, the feature table's paths, the experiment names its commands pick, the
derived figures of its results paragraphs, and that CI runs exactly the README's test command."""
import re
from pathlib import Path

import jaxformers as jf

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(title, 1)[1].split("\n## ", 1)[0]


def test_default_training_stated_in_the_readme_is_the_cli_default():
    """Quick start / Measured results: ``python -m experiments.train`` is gpt tiny, 300 steps of
    16 x 128 tokens, byte tokens, 10% warmup, into runs/gpt-tiny."""
    from experiments import train
    from jaxformers.training import TrainConfig
    d = train.DEFAULTS
    assert (d["model"], d["preset"]) == ("gpt", "tiny")
    m = re.search(r"`gpt` tiny, Shakespeare bytes,\s+(\d+) steps of (\d+) x (\d+) tokens", README)
    assert m and (int(m[1]), int(m[2]), int(m[3])) == (d["steps"], d["batch_size"], d["seq_len"])
    m = re.search(r"Warmup is (\d+)% of the schedule by default", README)
    assert m and int(m[1]) / 100 == d["warmup_fraction"] == TrainConfig().warmup_fraction
    assert d["tokenizer"] == "byte" and "(byte tokenizer;" in README
    assert "writes `runs/gpt-tiny/`" in README
    assert "default runs/<model>-<preset>" in train._parser().format_help().replace("\n", " ").replace("  ", " ")


def test_models_table_lists_every_registered_model_with_its_presets():
    table = _section("## Models")
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            rows[m[1]] = line.split(" | ")[2]
    from jaxformers.registry import get_spec
    builtin = [n for n in jf.list_models() if get_spec(n).module_cls.__module__.startswith("jaxformers.")]
    assert sorted(rows) == sorted(builtin)  # (other tests register toy models of their own)
    for name, cell in rows.items():
        listed = set(re.findall(r"\w+(?:-\w+)*(?:-\*)?", re.sub(r"\([^)]*\)", "", cell)))
        presets = set(jf.list_presets(name))
        for p in listed:
            if p.endswith("-*"):
                assert any(q.startswith(p[:-1]) for q in presets), (name, p)
            else:
                assert p in presets, (name, p, presets)
        for p in presets:  # every preset shown (a "llama-*" covers llama-tiny, ...)
            assert p in listed or any(x.endswith("-*") and p.startswith(x[:-1]) for x in listed), (name, p)


def test_feature_table_paths_exist():
    """The "where" column names files and folders, some relative to jaxformers/."""
    for line in _section("## Features").splitlines():
        if not line.startswith("| ") or line.startswith("| feature"):
            continue
        where = line.split(" | ")[-2]
        for ref in re.findall(r"`([\w./*-]+(?:\.py|/))`", where):
            assert any(list(REPO.glob(p.rstrip("/"))) for p in (ref, "jaxformers/" + ref)), ref


def test_experiment_subsets_named_in_the_readme_exist():
    """``--only`` / ``--models`` lists quoted in the results sections name real schemes / models."""
    from experiments import mamba, quarot
    for names in re.findall(r"`--only ((?:fp|W)[\w,]+)`", README):
        assert set(names.split(",")) <= set(quarot.SCHEMES), names
    for names in re.findall(r"`--models ([\w,]+)`", README):
        assert set(names.split(",")) <= set(mamba.MODELS), names
    for names in re.findall(r"`--only (\w*cotformer[\w,]*)`", README):
        for n in names.split(","):
            assert re.fullmatch(r"(cotformer|but|ln_cotformer|adaptive)_L\d+x\d+", n), n


def test_only_preset_experiments_are_documented_as_taking_a_preset():
    """"Paper experiments (``--preset tiny|gpu``)": each paper module of the Layout takes
    ``--preset`` with tiny and gpu, except the one the README names as taking ``--quick``."""
    layout = README.split("one module per reproduced paper:", 1)[1].split(";", 1)[0]
    modules = [m.strip() for m in layout.replace("\n", " ").split(",")]
    para = README.split("Paper experiments (", 1)[1].split("train what they need", 1)[0]
    for mod in modules:
        src = (REPO / "experiments" / f"{mod}.py").read_text()
        takes_preset = "experiment_parser(" in src
        if takes_preset:
            assert re.search(r'^    "tiny": dict', src, re.M) and re.search(r'^    "gpu": dict', src, re.M), mod
        else:
            assert f"`{mod}`" in para and "--quick" in para and '"--quick"' in src, mod


def _table(title):
    """The first table after ``title``: its header and data rows, as lists of cells."""
    lines = README.split(title, 1)[1].splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows if not set(r) <= set("|- ")]


def test_landmark_lm_memory_stays_within_the_stated_percentage_of_its_1x_value():
    rows = _table("**Landmark attention, language modelling**")
    pct = int(re.search(r"model with its memory stays within (\d+)% of its 1x value", README)[1])
    assert sum(r[0].startswith("landmark, memory top-") for r in rows) == 3
    for r in rows:
        if r[0].startswith("landmark, memory top-"):
            one, *longer = (float(x.replace("*", "")) for x in r[2:5])
            assert all(v / one - 1 <= pct / 100 for v in longer), (r, pct)


def test_layer_parallel_identical_compute_spread_is_as_stated():
    rows = _table("**Layer-parallel pairs**")
    stated = float(re.search(r"identical compute differ by up to ([\d.]+)x", README)[1])
    spread = 0.0
    paired = rows[2:]  # the header and the unpaired model (absolute speeds) left out
    assert len(paired) == 7
    for depth in {r[1] for r in paired}:
        same = [r for r in paired if r[1] == depth]
        for col in (4, 5, 6):
            vals = [float(r[col].rstrip("x")) for r in same]
            spread = max(spread, max(vals) / min(vals))
    assert round(spread, 1) == stated, (spread, stated)


def test_ci_runs_exactly_the_readme_test_command():
    quick = _section("## Quick start")
    assert re.search(r"^scripts/test\.sh$", quick, re.M)
    ci = [l for l in (REPO / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert ci == ["scripts/test.sh"]
    leg1 = re.search(r'`pip install -e "(\.\[[\w,]+\])" && python (-m pytest [^`]+)`', README)
    test_sh = (REPO / "scripts/test.sh").read_text()
    body = test_sh.split("leg1() {", 1)[1].split("\n}\n", 1)[0]
    assert f'pip install -q -e "{leg1[1]}"' in body and '"${PYTEST[@]}"' in body
    assert re.search(r"^PYTEST=\(" + re.escape(leg1[2]) + r"\)$", test_sh, re.M), leg1[2]
    extras = set(leg1[1][2:-1].split(","))
    pyproject = (REPO / "pyproject.toml").read_text()
    declared = set(re.findall(r"^(\w+) = \[", pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0], re.M))
    assert extras <= declared, (extras, declared)
