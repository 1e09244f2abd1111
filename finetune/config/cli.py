"""Command lines of the export and publish scripts: Hydra `key=value` overrides onto a dataclass schema.

The same override grammar as the training recipes (`export.kind=merged export.bits=3`), composed through Hydra's
compose API on a structured config: an unknown key or a value of the wrong type fails with a one-line
`RecipeError` naming the key, and a required key left unset names itself.
"""

from dataclasses import fields, is_dataclass

from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from .recipe import RecipeError


def _keys(schema, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        keys += _keys(default, f"{prefix}{f.name}.") if is_dataclass(default) else [f"{prefix}{f.name}"]
    return keys


def compose_config(schema: type, args: list[str]) -> DictConfig:
    """`schema` (a dataclass) with the `key=value` overrides in `args` applied, type-checked, nothing missing."""
    name = schema.__name__
    ConfigStore.instance().store(name=name, node=schema)
    bad = next((a for a in args if a.startswith("-") or "=" not in a), None)
    if bad is not None:
        raise RecipeError(f"argument {bad!r} is not key=value; valid keys: {', '.join(_keys(schema))}")
    try:
        with initialize(version_base=None):
            cfg = compose(config_name=name, overrides=list(args))
    except OverrideParseException as err:
        raise RecipeError(f"{str(err).splitlines()[0]}: arguments are key=value") from None
    except ConfigCompositionException as err:
        cause = err.__cause__
        key = getattr(cause, "full_key", None) or "?"
        if "not in" in str(cause) or "Could not override" in str(err):
            raise RecipeError(f"unknown key {key!r}; valid keys: {', '.join(_keys(schema))}") from None
        raise RecipeError(f"{key}: {str(cause).splitlines()[0] if cause else err}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RecipeError(f"{missing[0]} is required; pass {missing[0]}=...")
    return cfg
