"""The evaluation's settings and benchmarks: eval/benchmarks.yaml's entries, every eval.* check, and the items
a benchmark is scored on (all, or a seeded sample)."""

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig

from .. import REPO_ROOT
from ..config.recipe import RecipeError
from ..data.registry import QAItem, QASplit, load_benchmark, resolve_options

BENCHMARKS_FILE = REPO_ROOT / "eval" / "benchmarks.yaml"
MODES = ("loglik", "generate", "sc")
DTYPES = (None, "bfloat16", "float16", "float32")


class EvalError(RecipeError):
    """A bad evaluation input; one line naming the cause and the fix."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """One entry of eval/benchmarks.yaml."""

    name: str
    title: str
    loader: str
    split: str
    source: str
    group_by: str | None
    paper: float | None
    loader_options: dict


def benchmark_specs(path: Path = BENCHMARKS_FILE) -> dict[str, BenchmarkSpec]:
    specs = yaml.safe_load(path.read_text())["benchmarks"]
    return {name: BenchmarkSpec(name=name, **spec) for name, spec in specs.items()}


def paper_only(path: Path = BENCHMARKS_FILE) -> dict:
    """The paper's benchmarks that are not evaluated here (results.md lists them)."""
    return yaml.safe_load(path.read_text()).get("paper_only") or {}


def check_settings(cfg: DictConfig) -> list[BenchmarkSpec]:
    """The benchmarks asked for, after checking every eval.* value."""
    ev = cfg.eval
    if ev.mode not in MODES:
        raise EvalError(f"eval.mode={ev.mode!r} is not one of {', '.join(MODES)}")
    for key, value in {"eval.batch_size": ev.batch_size if ev.batch_size is not None else 1,
                       "eval.max_new_tokens": ev.max_new_tokens,
                       "eval.sc.k": ev.sc.k, "eval.limit": ev.limit if ev.limit is not None else 1}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EvalError(f"{key}={value!r} must be an integer of at least 1")
    if ev.dtype not in DTYPES:
        raise EvalError(f"eval.dtype={ev.dtype!r} is not one of {', '.join(d for d in DTYPES if d)} (or null: bfloat16 "
                        "on GPU, float32 on CPU)")
    if ev.mode == "sc" and ev.sc.temperature <= 0:
        raise EvalError(f"eval.sc.temperature={ev.sc.temperature} must be > 0 for sampling "
                        "(greedy is eval.mode=generate)")
    specs = benchmark_specs()
    if not ev.benchmarks:
        raise EvalError(f"eval.benchmarks is empty; pick from {', '.join(specs)}, e.g. eval.benchmarks=[pubmedqa]")
    unknown = [name for name in ev.benchmarks if name not in specs]
    if unknown:
        raise EvalError(f"unknown benchmark {unknown[0]!r} in eval.benchmarks; pick from {', '.join(specs)} "
                        f"(or add it to {BENCHMARKS_FILE})")
    return [specs[name] for name in dict.fromkeys(ev.benchmarks)]


def eval_batch_size(cfg: DictConfig) -> int:
    """eval.batch_size, or when it is null: 64 questions on a GPU (fastest measured at 70B, 49 GiB; see
    eval/BENCHMARKS.md), 8 on the CPU (as fast per question there, and the progress bar moves)."""
    return cfg.eval.batch_size or (64 if torch.cuda.is_available() else 8)


def load_items(spec: BenchmarkSpec, cfg: DictConfig, limit: int | None) -> tuple[QASplit, list[QAItem]]:
    """The benchmark split, and the items evaluated: all, or `limit` drawn with eval.seed (kept in file order,
    so that a slice of PubMedQA, whose test file is sorted by label, still mixes yes, no and maybe)."""
    options = resolve_options(spec.loader_options)  # training's rule for relative paths
    try:
        split = load_benchmark(spec.loader, spec.split, source=spec.source, data_root=cfg.data.data_root,
                               on_bad_row=cfg.data.on_bad_row, **options)
    except (ValueError, TypeError) as err:
        raise EvalError(f"benchmark {spec.name}: {err}") from None
    items = split.items
    if limit is not None and limit < len(items):
        picked = sorted(random.Random(cfg.eval.seed).sample(range(len(items)), limit))
        items = [items[i] for i in picked]
    return split, items
