"""Model families by name: `config.model.family` names the module that defines one.

A name without a dot is a module of this package (`demo` -> `jaxcond.models.demo`); a
dotted name is any importable module (`my_project.my_family`). Either way the module
defines `FAMILY`, a `jaxcond.models.family.Family` subclass: adding a family is one new
module plus its config file, and nothing else in jaxcond names a concrete family.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections

from jaxcond import storage
from jaxcond.checks import ConfigError
from jaxcond.models.family import Family


def family_name(model: ml_collections.ConfigDict) -> str:
    """`config.model.family`; configs saved before the field existed named the demo by
    `model.source = "demo"`."""
    name = model.get("family")
    return name or ("demo" if model.get("source") == "demo" else "unet_clip")


def as_read(model: Mapping) -> dict:
    """A saved `config.model` (JSON) with `family` filled in as `family_name` reads it, and
    without the demo's fields unless the family is the demo: configs saved before the
    field existed carried them in every config. What a resume compares."""
    family = family_name(ml_collections.ConfigDict(dict(model)))
    return {**{k: v for k, v in model.items() if k != "demo" or family == "demo"}, "family": family}


# Family names whose module has another name: flux.py is Flux's transformer alone.
_MODULES = {"flux": "flux_family"}


def family_class(name: str) -> type[Family]:
    """The `FAMILY` of module `name` (see the module docstring)."""
    module_name = name if "." in name else f"{__package__}.{_MODULES.get(name, name)}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):  # a module it imports is missing
            raise
        raise ConfigError(f"config.model.family = {name!r}: no module {module_name}; use a module of "
                          "jaxcond/models/ (demo, unet_clip) or an importable module path defining "
                          "FAMILY") from None
    cls = getattr(module, "FAMILY", None)
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise ConfigError(f"config.model.family = {name!r}: {module_name} defines no FAMILY "
                          "(a jaxcond.models.family.Family subclass)")
    return cls


def check_config(model: ml_collections.ConfigDict) -> type[Family]:
    """Checks `config.model` with its family's own checks; returns the family class."""
    cls = family_class(family_name(model))
    cls.check_config(model)
    return cls


def from_config(model: ml_collections.ConfigDict, *, workdir: str, dtype: jnp.dtype,
                resolution: int, shapes_only: bool = False) -> Family:
    """The family of `config.model`, loaded (`Family.from_config`). A source on Cloud
    Storage is read from a local copy (storage.local_folder): model libraries read files."""
    if storage.is_url(model.source):
        model = copy.deepcopy(model)
        with model.unlocked():
            model.source = storage.local_folder(model.source)
    extra = {"shapes_only": True} if shapes_only else {}  # families written before it still load
    return family_class(family_name(model)).from_config(model, workdir=workdir, dtype=dtype,
                                                          resolution=resolution, **extra)
