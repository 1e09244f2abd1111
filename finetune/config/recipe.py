"""Hydra recipes: `recipe=<name>` picks `recipes/<name>.yaml` (or `recipe=path/to/mine.yaml`), and every other
argument is a Hydra override `key=value` (`lora.r=32`, `model.revision=gptq-4bit-32g-actorder_True`).

Composition goes through Hydra's compose API in struct mode, so an unknown key fails instead of being silently
added. Every failure is a `RecipeError` with a one-line message naming the key and the fix; all of it runs
before any model or data is touched.
"""

import importlib.util
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf

from .. import REPO_ROOT
from .files import lock_holder

RECIPES_DIR = REPO_ROOT / "recipes"
DEFAULT_RECIPE = "smoke"  # offline and small: what a bare `train.py` runs
CHECKPOINTS = "checkpoints"  # the Trainer's checkpoint-N folders, inside the run directory
RUN_LOCK = ".train.lock"  # held by the training that writes the run directory (files.hold_lock)
CODE_READS_TRAIN_KEYS = ("train.dry_run", "train.max_length")  # the other train.* go to SFTConfig untouched

USAGE = """usage: accelerate launch finetune/train.py [recipe=NAME|PATH.yaml] [key=value ...] [--help]

  recipe=NAME     recipes/NAME.yaml (default: smoke); a path to a .yaml may build on recipes/base.yaml too
  key=value       override any key below, e.g. lora.r=32 train.max_steps=100 output_dir=runs/try2
  +key=value      add a key the recipe lacks (e.g. +train.optim=adafactor: `train` goes to TRL's SFTConfig)
  ~key            remove a data.train entry or a train.* key (e.g. ~train.lr_scheduler_kwargs)
  resume=true     continue the run in output_dir from its last checkpoint
  train.dry_run=true   check config and data, show two examples and the memory estimate, run two steps"""


class RecipeError(ValueError):
    """A bad recipe, override or value; its message is one line naming the cause and the fix."""


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base")


def split_args(args: list[str]) -> tuple[str, list[str]]:
    """(recipe, Hydra overrides) from command-line arguments."""
    recipe, overrides = DEFAULT_RECIPE, []
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise RecipeError(f"unknown option {arg!r}; options are key=value overrides (see --help)")
        else:
            overrides.append(arg)
    return recipe, overrides


def compose_recipe(recipe: str, overrides: list[str] = ()) -> DictConfig:
    """The resolved, type-checked config of `recipe` with `overrides` applied (struct mode: no new keys)."""
    search = []  # the recipes folder, for a recipe file elsewhere: its `defaults: [base]` must resolve
    if recipe.endswith((".yaml", ".yml")):
        path = Path(recipe).expanduser().resolve()
        if not path.is_file():
            raise RecipeError(f"recipe file {recipe} not found; pass an existing .yaml or one of: "
                              f"{', '.join(available_recipes())}")
        config_dir, name = path.parent, path.stem
        search = [f"hydra.searchpath=[file://{RECIPES_DIR}]"]
    else:
        if recipe not in available_recipes():
            raise RecipeError(f"no recipe {recipe!r}; pick one of: {', '.join(available_recipes())} "
                              "(or pass a path to a .yaml)")
        config_dir, name = RECIPES_DIR, recipe
    try:
        with initialize_config_dir(str(config_dir), version_base=None):
            cfg = compose(config_name=name, overrides=[*overrides, *search])
    except OverrideParseException as err:
        raise RecipeError(f"{str(err).splitlines()[0]}: overrides are key=value (see --help)") from None
    except (ConfigCompositionException, MissingConfigException) as err:
        raise RecipeError(_composition_message(err, config_dir, name, search)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RecipeError(f"recipe {recipe} leaves {missing[0]} unset; pass {missing[0]}=...")
    check_types(cfg, OmegaConf.load(RECIPES_DIR / "base.yaml"))
    return cfg


def _composition_message(err: Exception, config_dir: Path, name: str, search: list[str]) -> str:
    """One line for Hydra's composition errors; an unknown key gets the keys that are valid there."""
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if full_key and "not in struct" in str(cause):
        with initialize_config_dir(str(config_dir), version_base=None):
            plain = compose(config_name=name, overrides=search)
        parent_key, _, _ = full_key.rpartition(".")
        parent = OmegaConf.select(plain, parent_key) if parent_key else None
        top = ", ".join(plain.keys())
        where = f"; {parent_key} has: {', '.join(parent.keys())}" if isinstance(parent, DictConfig) else ""
        return f"unknown key {full_key!r}{where} (top-level keys: {top}); fix the name, or add it with +{full_key}=..."
    return " ".join(str(err).split())


def check_types(cfg: DictConfig, defaults: DictConfig, prefix: str = "") -> None:
    """Each value must have the type of its default in base.yaml (an int may stand for a float), and no key the
    code reads may be removed; `train` keys may be (~train.X): TRL's SFTConfig has a default for each."""
    for key in defaults:
        full_key = f"{prefix}{key}"
        if key not in cfg:
            if full_key.startswith("train.") and full_key not in CODE_READS_TRAIN_KEYS:
                continue
            raise RecipeError(f"{full_key} was removed; every key of recipes/base.yaml stays (set it instead)")
        value = cfg[key]
        if OmegaConf.is_missing(defaults, key):  # required: base.yaml has ???
            if value is None:
                raise RecipeError(f"{full_key} must be set; pass {full_key}=...")
            continue
        default = defaults[key]
        if default is None:
            continue
        if isinstance(default, DictConfig):
            if isinstance(value, DictConfig):
                check_types(value, default, f"{full_key}.")
                continue
            expected = "a mapping"
        elif value is None:
            continue  # null switches an option off
        elif isinstance(default, ListConfig):
            if isinstance(value, ListConfig):
                continue
            expected = "a list like [a,b]"
        elif isinstance(default, bool):
            if isinstance(value, bool):
                continue
            expected = "true or false"
        elif isinstance(default, (int, float)):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    (isinstance(default, float) or isinstance(value, int)):
                continue
            expected = "a number" if isinstance(default, float) else "an integer"
        elif isinstance(value, str):
            continue
        else:
            expected = "a string"
        raise RecipeError(f"{full_key}={value!r} should be {expected}")


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint. The Trainer writes trainer_state.json last, so a folder without it, or
    with a cut-off one, is what a run killed while saving left half-written: resume skips it."""

    def complete(folder: Path) -> bool:
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return False
        return state.get("global_step") == int(folder.name.split("-")[-1])

    folders = [p for p in (Path(run_dir) / CHECKPOINTS).glob("checkpoint-*")
               if p.name.split("-")[-1].isdigit() and complete(p)]
    return max(folders, key=lambda p: int(p.name.split("-")[-1]), default=None)


def check_run_dir(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from (None: start at the first step); refuses a directory another training is
    writing, and never overwrites a finished or started run."""
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"output_dir {run_dir} is a file; pass a directory path (it is created if missing)")
    holder = lock_holder(run_dir / RUN_LOCK)
    if holder is not None:
        raise RecipeError(f"output_dir {run_dir} is in use by a running training (process {holder}); wait for it "
                          "to end, or pass another output_dir=...")
    if cfg.resume:
        if not (run_dir / "config.yaml").is_file():
            raise RecipeError(f"resume=true but {run_dir} holds no run (no config.yaml); pass the output_dir of an "
                              "earlier run, or drop resume=true")
        return last_checkpoint(run_dir)  # None: stopped before its first checkpoint, so it starts over
    if run_dir.exists() and any(p.name != RUN_LOCK for p in run_dir.iterdir()) and not cfg.train.dry_run:
        raise RecipeError(f"output_dir {run_dir} already holds a run; pass a new output_dir=... or resume=true "
                          "to continue it")
    return None


def check_lora_settings(cfg: DictConfig) -> None:
    """LoRA's numbers, checked before loading (PEFT checks the rank only as it wraps the first layer)."""
    lora = cfg.lora
    if lora.r < 1:
        raise RecipeError(f"lora.r={lora.r} must be a rank of at least 1; pass e.g. lora.r=16")
    if lora.alpha <= 0:
        raise RecipeError(f"lora.alpha={lora.alpha} must be > 0 (LoRA scales its update by alpha/r); pass e.g. "
                          f"lora.alpha={2 * lora.r}")
    if not 0 <= lora.dropout < 1:
        raise RecipeError(f"lora.dropout={lora.dropout} must be in [0, 1); pass e.g. lora.dropout=0.05")
    if not lora.target_modules:
        raise RecipeError("lora.target_modules is empty; list the linear layers to adapt, e.g. "
                          "lora.target_modules=[q_proj,v_proj]")


def check_profile_step(cfg: DictConfig) -> None:
    """profile_step names an optimiser step the run will take."""
    step, max_steps = cfg.profile_step, cfg.train.get("max_steps", -1)
    if step is None:
        return
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise RecipeError(f"profile_step={step!r} should be an optimiser step number >= 1 (e.g. 5, after warm-up), "
                          "or null for no profile")
    if max_steps > 0 and step > max_steps:
        raise RecipeError(f"profile_step={step} is after the run's last step (train.max_steps={max_steps}); pass "
                          f"profile_step={min(5, max_steps)}")


def check_gpu_settings(cfg: DictConfig, on_gpu: bool) -> None:
    """The `gpu` settings, checked before loading: memory sizes are numbers or null; gpu.fast_path on a GPU uses
    liger-kernel, the `gpu` extra."""
    for key in ("memory_budget_gib", "host_memory_gib"):
        value = cfg.gpu[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise RecipeError(f"gpu.{key}={value!r} should be a number of GiB >= 0, or null for the default")
    if cfg.gpu.all_gather not in ("nccl", "copy_engine"):
        raise RecipeError(f"gpu.all_gather={cfg.gpu.all_gather!r} should be nccl or copy_engine")
    if on_gpu and cfg.gpu.fast_path and importlib.util.find_spec("liger_kernel") is None:
        raise RecipeError("gpu.fast_path=true needs liger-kernel on a GPU machine: pip install -e '.[gpu]' (or "
                          "gpu.fast_path=false for the plain path)")


def usage(args: list[str]) -> str:
    """--help: usage, the recipes, and the resolved config of the recipe and overrides given."""
    recipe, overrides = split_args([a for a in args if a not in ("--help", "-h")])
    lines = [USAGE, "", "recipes: " + ", ".join(available_recipes()) + f"  (in {RECIPES_DIR})", ""]
    try:
        cfg = compose_recipe(recipe, overrides)
        lines += [f"resolved config (recipe={recipe}{' ' if overrides else ''}{' '.join(overrides)}):",
                  OmegaConf.to_yaml(cfg)]
    except RecipeError as err:
        lines.append(f"error: {err}")
    return "\n".join(lines)
