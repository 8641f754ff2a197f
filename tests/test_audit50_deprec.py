"""Audit 50 (deprecations): our code names no deprecated jax / flax / optax / orbax / chex
module attribute, on the jax installed (0.10.2 and the newest: both CI legs run this file).

The pytest filter in pyproject.toml turns a DeprecationWarning attributed to our modules into an
error, but only on the paths the tests run, and a module attribute deprecated through jax's
``_deprecations`` tables (``jax.sharding.SingleDeviceSharding`` from jax 0.12.1, ``pl.GridSpec``,
``jax.experimental.shard_map.shard_map``, ...) warns only at the first lookup in a process:
orbax 0.12.8 looks ``jax.sharding.SingleDeviceSharding`` up when it is imported, so our own use
of it (``load_run``) never warned in the suite.  So this test reads every ``alias.attr.attr``
chain and every ``from MODULE import NAME`` of ``jaxformers/``, ``pallas_kernels/`` and
``experiments/`` (the GPU / TPU only branches and the experiments no test runs included) and
fails on each name that is in its module's ``_deprecations`` table or warns when looked up.
Fast: no program is compiled.  Names this jax lacks (ones behind ``hasattr`` / ``try`` for
other versions) are skipped.
"""
from __future__ import annotations

import ast
import importlib
import pathlib
import types
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jaxformers", "pallas_kernels", "experiments")
LIBRARIES = ("jax", "flax", "optax", "orbax", "chex")
DEPRECATIONS = (DeprecationWarning, FutureWarning, PendingDeprecationWarning)


def _sources():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _library(name: str) -> bool:
    return name.split(".")[0] in LIBRARIES


def _uses(tree: ast.AST):
    """``(lineno, module, [attr, ...])`` per library attribute chain and ``from m import name``."""
    aliases = {}  # local name -> module path (every import of the file, functions' included)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _library(a.name):
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _library(node.module):
            for a in node.names:
                if a.name != "*":
                    out.append((node.lineno, node.module, [a.name]))
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                out.append((node.lineno, aliases[cur.id], chain[::-1]))
    return out


_MISSING = object()


def _resolve(module: str):
    """The module (or attribute) ``module`` names, or _MISSING where this jax has none."""
    try:
        return importlib.import_module(module)
    except ImportError:
        head, _, tail = module.rpartition(".")
        if not head:
            return _MISSING
        parent = _resolve(head)
        if parent is _MISSING:
            return _MISSING
        with warnings.catch_warnings():  # a deprecated ``from m import name``: its own use reports it
            warnings.simplefilter("ignore")
            try:
                return getattr(parent, tail, _MISSING)
            except Exception:  # noqa: BLE001 - a finalized deprecation raises
                return _MISSING
    except Exception:  # noqa: BLE001 - a module this platform cannot import (e.g. a GPU-only one)
        return _MISSING


def _table_entry(module, name):
    """The deprecation message of ``module.name`` from the module's ``_deprecations`` table (jax's
    and optax's module ``__getattr__`` deprecations), or None.  Read from the table, not only from
    the warning: jax warns once per process (its ``__getattr__`` is cached), and a library that
    looked the name up first (orbax 0.12.8 annotates with ``jax.sharding.SingleDeviceSharding``)
    would hide our use of it."""
    table = getattr(module, "_deprecations", None)
    if isinstance(table, dict) and name in table and name not in vars(module):
        entry = table[name]
        return str(entry[0] if isinstance(entry, tuple) else entry)
    return None


def _deprecated_lookups(obj, chain):
    """What is deprecated in looking up ``chain`` on ``obj``, attribute by attribute (into modules
    and classes only): the table entries, and any deprecation warning raised by the lookup."""
    found = []
    for name in chain:
        if not isinstance(obj, (types.ModuleType, type)):
            break
        if isinstance(obj, types.ModuleType):
            msg = _table_entry(obj, name)
            if msg is not None:
                found.append(msg)
                break
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            try:
                nxt = getattr(obj, name)
            except AttributeError:
                nxt = _MISSING
                if isinstance(obj, types.ModuleType):  # a submodule not imported yet
                    try:
                        nxt = importlib.import_module(f"{obj.__name__}.{name}")
                    except Exception:  # noqa: BLE001 - absent in this version
                        pass
            except Exception:  # noqa: BLE001
                nxt = _MISSING
        # a deprecation warning of the lookup names the caller (this file); an import's own
        # warnings (a submodule imported for the first time) are the library's, not a use of ours
        found += [str(w.message) for w in rec
                  if issubclass(w.category, DEPRECATIONS) and w.filename == __file__]
        if nxt is _MISSING:
            break
        obj = nxt
    return found


def test_sources_found():
    files = _sources()
    assert len(files) > 50 and any(p.name == "rundir.py" for p in files)
    uses = [u for p in files for u in _uses(ast.parse(p.read_text(), str(p)))]
    assert any(m == "jax" and c[:1] == ["sharding"] for _, m, c in uses)  # the chains are seen


def test_chain_check_sees_a_module_deprecation():
    """The check itself: a name jax deprecates through a module ``__getattr__`` is reported (each
    version has one: jax.experimental.shard_map.shard_map from 0.8 on, removed one day: skip)."""
    obj = _resolve("jax.experimental.shard_map")
    if obj is _MISSING or "shard_map" not in getattr(obj, "_deprecations", {}):
        pytest.skip("this jax has no deprecated jax.experimental.shard_map.shard_map")
    assert _deprecated_lookups(obj, ["shard_map"])


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_deprecated_library_attribute(path):
    found = []
    for lineno, module, chain in _uses(ast.parse(path.read_text(), str(path))):
        obj = _resolve(module)
        if obj is _MISSING:
            continue
        for msg in _deprecated_lookups(obj, chain):
            found.append(f"{path.relative_to(ROOT)}:{lineno}: {module}.{'.'.join(chain)}: {msg}")
    assert not found, "deprecated names used:\n" + "\n".join(found)
