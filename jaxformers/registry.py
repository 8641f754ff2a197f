"""Registry of architectures by name: config class, module class and presets.

Each architecture module calls :func:`register` at import time::

    register("gpt", GPTConfig-ish class, Transformer, presets={"tiny": {...}, ...})

A taken name is refused unless ``override=True``; :func:`unregister` removes one.

``get_config(name, preset, **overrides)`` then validates everything.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Dict, Optional, Type

from .config import ATTENTION_FIELDS, ModelConfig, check_fields


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: Type[ModelConfig]
    module_cls: Callable
    presets: Dict[str, dict]
    description: str = ""
    #: ``__name__`` of the module that called :func:`register` (``"__main__"`` for a script); a
    #: run of an architecture of your own records it (``TrainConfig.imports``) to import it again
    module: Optional[str] = dataclasses.field(default=None, compare=False)


_REGISTRY: Dict[str, ModelSpec] = {}


def register(name, config_cls, module_cls, presets, description="", *, override=False):
    """Register architecture ``name``: its config class (a :class:`ModelConfig` subclass), module
    class and presets (a dict of preset name -> dict of config fields; a ``tiny`` one is required;
    an unknown field is a ``ValueError`` naming the preset, before anything is registered).  A
    name that is taken (a built-in such as ``gpt`` too) is a ``ValueError`` unless
    ``override=True``; registering the same spec again is a no-op.  :func:`unregister` removes a
    name (e.g. at the end of a test)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    _check_spec(name, config_cls, module_cls, presets)
    _ensure_loaded()  # a built-in name is taken even before the models package is imported
    spec = ModelSpec(name, config_cls, module_cls, dict(presets), description,
                     module=calling_module())
    if name in _REGISTRY and _REGISTRY[name] != spec and not override:
        raise ValueError(f"model {name!r} is already registered ({_REGISTRY[name].module_cls.__name__}); "
                         "pass override=True to replace it, or choose another name")
    if name in _REGISTRY and _REGISTRY[name] == spec:
        return  # the same spec again: the first registration (and its module) stays
    _REGISTRY[name] = spec


def _check_spec(name, config_cls, module_cls, presets) -> None:
    """``ValueError`` (naming the model, and the preset) unless ``config_cls`` is a
    :class:`ModelConfig` subclass, ``module_cls`` callable and ``presets`` a dict of preset name ->
    dict of ``config_cls`` fields with a ``tiny`` one: checked when registering, so that a typo in a
    preset is not a ``TypeError`` from the dataclass at the first ``get_config`` (with the bad spec
    already registered)."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, ModelConfig)):
        raise ValueError(f"model {name!r}: config_cls must be a ModelConfig subclass (a frozen dataclass, "
                         f"e.g. TransformerConfig), got {config_cls!r}")
    if not callable(module_cls):
        raise ValueError(f"model {name!r}: module_cls must be a flax module class (built as "
                         f"module_cls(config)), got {module_cls!r}")
    if not isinstance(presets, dict):
        raise ValueError(f"model {name!r}: presets must be a dict of preset name -> dict of config fields "
                         f"(with a 'tiny' one), got {type(presets).__name__}")
    if "tiny" not in presets:
        raise ValueError(f"model {name!r} must define a 'tiny' preset")
    for preset, values in presets.items():
        if not isinstance(preset, str) or not isinstance(values, dict):
            raise ValueError(f"model {name!r}: presets must map preset names (str) to dicts of config fields, "
                             f"got {preset!r}: {type(values).__name__}")
        try:
            check_fields(config_cls, values)
        except ValueError as e:
            raise ValueError(f"model {name!r}, preset {preset!r}: {e}") from None


def calling_module(depth: int = 2) -> Optional[str]:
    """``__name__`` of the module whose code called the function that calls this (``depth=2``):
    the module a new process must import to register the same thing again."""
    try:
        return sys._getframe(depth).f_globals.get("__name__")
    except ValueError:  # pragma: no cover - a shallower stack
        return None


def unregister(name: str) -> ModelSpec:
    """Remove architecture ``name`` from the registry; returns its spec (``ValueError`` if unknown)."""
    spec = get_spec(name)
    del _REGISTRY[name]
    return spec


def _ensure_loaded():
    # Importing the models package registers every built-in architecture.
    from . import models  # noqa: F401


def list_models():
    """Names of every registered architecture, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown model name={name!r}; choose one of {sorted(_REGISTRY)} (an architecture "
                         "of your own: import the module that registers it first; the CLIs' --import MODULE)")
    return _REGISTRY[name]


def list_presets(name: str):
    return list(get_spec(name).presets)


def get_config(name: str, preset: str = "tiny", **overrides) -> ModelConfig:
    """Frozen config for architecture ``name`` at ``preset``, with field overrides."""
    spec = get_spec(name)
    if not isinstance(preset, str) or preset not in spec.presets:
        raise ValueError(
            f"unknown preset={preset!r} for model {name!r}; choose one of {list(spec.presets)}"
        )
    values = dict(spec.presets[preset])
    check_fields(spec.config_cls, overrides)
    if overrides.get("model", name) != name:
        raise ValueError(f"model={overrides['model']!r} contradicts name={name!r}: the architecture is "
                         f"the name (get_config({overrides['model']!r}, ...) builds that one)")
    values.update(overrides)
    values["model"] = name
    return spec.config_cls(**values)


def config_from_dict(values: dict) -> ModelConfig:
    """Rebuild a config saved with ``config.to_dict()`` (e.g. a run's config.json).

    ``ValueError`` unless ``values`` is a dict with ``model`` (which architecture: never guessed).
    Fields added since the config was saved take their defaults (``weight_decay_groups``:
    ``"shape"``, the rule such runs trained with); attention fields saved
    (before the per-family split) for a family that has none are dropped.
    """
    if not isinstance(values, dict) or "model" not in values:
        raise ValueError("values must be a saved config dict (config.to_dict()) naming its architecture "
                         f"('model'), got {type(values).__name__}"
                         + (f" with keys {sorted(values)}" if isinstance(values, dict) else ""))
    values = dict(values)
    spec = get_spec(values["model"])
    # Configs saved before the per-family split carried the attention fields for every model;
    # they never had an effect on a family without attention, so they are dropped there.
    known = {f.name for f in dataclasses.fields(spec.config_cls)}
    for name in ATTENTION_FIELDS:
        if name not in known:
            values.pop(name, None)
    # saved before weight_decay_groups existed: trained with the shape rule (whatever the
    # family's default is now), so that is what a resume or an evaluation of it keeps
    values.setdefault("weight_decay_groups", "shape")
    check_fields(spec.config_cls, values)
    return spec.config_cls(**values)


def check_config_class(config: ModelConfig) -> None:
    """``ValueError`` unless ``config.model`` is built from exactly ``type(config)``.

    A config of another class than the one registered for its ``model`` would build that model
    with some fields dropped or ignored (e.g. ``DenseFormerConfig(model="gpt")``: a plain GPT, the
    DWA fields ignored; a subclass is no exception).  Every config checks this when it is made
    (``ModelConfig.__post_init__``) and ``build`` again.  A name nobody registered passes here
    (``build`` then refuses it) unless ``type(config)`` is registered under other names.
    """
    _ensure_loaded()
    name, cls = getattr(config, "model", None), type(config)
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is not None and cls is spec.config_cls:
        return
    if spec is not None:
        raise ValueError(
            f"model={name!r} needs a {spec.config_cls.__name__}, this config is a {cls.__name__}: fields "
            f"would be dropped or ignored; build it with get_config({name!r}, preset, **fields)")
    own = sorted(n for n, s in _REGISTRY.items() if s.config_cls is cls)
    if own:
        raise ValueError(f"model={name!r} is not allowed for a {cls.__name__}: choose one of {own}")


def build(config: ModelConfig):
    """The ``flax.linen.Module`` for ``config`` (look-up by ``config.model``)."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig (from get_config), got {type(config).__name__}")
    spec = get_spec(config.model)
    check_config_class(config)
    return spec.module_cls(config)
