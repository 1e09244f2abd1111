"""The medical QA benchmarks by name: `load_benchmark("medmcqa", "dev")` -> a `QASplit` of `QAItem`s.

`BENCHMARKS` says, for each benchmark, which adapter reads it, its evaluation split, where its files lie under the
data root (in the layout of their original releases) and how its Hub copy is reached. The adapters themselves live
in `pubmedqa` (PubMedQA), `medmcqa` and `medqa`; the record type in `records`.

Hub note: bigbio/pubmed_qa and bigbio/med_qa are loading scripts, which `datasets` >= 4 no longer runs; PubMedQA
therefore comes from its authors' Parquet copy qiaojin/PubMedQA, and MedQA 5-option from the Hub fails with a
one-line error unless a `revision` with Parquet files is given -- its local files always work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import REPO_ROOT
from .medmcqa import load_medmcqa
from .medqa import load_medqa
from .pubmedqa import PUBMEDQA_LABELS, PUBMEDQA_SPLITS, load_pubmedqa, official_pubmedqa_split
from .records import QAItem, QASplit

__all__ = [
    "BENCHMARKS",
    "PUBMEDQA_LABELS",
    "Benchmark",
    "QAItem",
    "QASplit",
    "default_data_root",
    "get_benchmark",
    "load_benchmark",
    "load_medmcqa",
    "load_medqa",
    "load_pubmedqa",
    "local_files",
    "official_pubmedqa_split",
]

SOURCES = ("local", "hub")


@dataclass(frozen=True)
class Benchmark:
    name: str
    load: Callable[..., QASplit]  # load(split, on_bad_row=..., **options)
    default_split: str  # the split the benchmark is evaluated on
    splits: tuple[str, ...]
    local_files: dict[str, str]  # adapter argument -> file under the data root; "{split}" becomes the split name
    local_options: dict[str, Any] = field(default_factory=dict)  # what the local files need (e.g. cop_base=1)
    hub_options: dict[str, Any] = field(default_factory=dict)  # what the Hub copy needs (e.g. cop_base=0)


BENCHMARKS: dict[str, Benchmark] = {
    "pubmedqa": Benchmark(
        "pubmedqa",
        load_pubmedqa,
        default_split="test",
        splits=PUBMEDQA_SPLITS,
        local_files={"path": "pubmedqa/ori_pqal.json", "test_split_path": "pubmedqa/test_ground_truth.json"},
        hub_options={"hub_id": "qiaojin/PubMedQA", "hub_config": "pqa_labeled"},
    ),
    "medmcqa": Benchmark(
        "medmcqa",
        load_medmcqa,
        default_split="dev",
        splits=("train", "dev"),
        local_files={"path": "medmcqa/{split}.json"},
        local_options={"cop_base": 1},
        hub_options={"hub_id": "openlifescienceai/medmcqa", "cop_base": 0},
    ),
    "medqa": Benchmark(
        "medqa",
        load_medqa,
        default_split="test",
        splits=("train", "dev", "test"),
        local_files={"path": "medqa/US/{split}.jsonl"},
        local_options={"num_options": 5},
        hub_options={"num_options": 5, "hub_id": "bigbio/med_qa", "hub_config": "med_qa_en_source"},
    ),
    "medqa4": Benchmark(
        "medqa4",
        load_medqa,
        default_split="test",
        splits=("train", "dev", "test"),
        local_files={"path": "medqa/US/4_options/phrases_no_exclude_{split}.jsonl"},
        local_options={"num_options": 4},
        hub_options={"num_options": 4, "hub_id": "GBaker/MedQA-USMLE-4-options", "hub_config": None},
    ),
}


def default_data_root() -> Path:
    """`$MEDQA_DATA_ROOT`, else `shared/data` beside the repository, where CI keeps the benchmark files."""
    env = os.environ.get("MEDQA_DATA_ROOT")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; fix: use one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def local_files(name: str, split: str | None = None, data_root: str | Path | None = None) -> dict[str, Path]:
    """The local files a benchmark split is read from (adapter argument -> path), whether or not they exist."""
    benchmark = get_benchmark(name)
    root = Path(data_root) if data_root is not None else default_data_root()
    split = split or benchmark.default_split
    return {key: root / relative.format(split=split) for key, relative in benchmark.local_files.items()}


def load_benchmark(
    name: str,
    split: str | None = None,
    *,
    source: str = "local",
    data_root: str | Path | None = None,
    on_bad_row: str = "error",
    **options: Any,
) -> QASplit:
    """Load a benchmark split from the data root (`source="local"`) or the Hub (`source="hub"`).

    `options` go to the adapter and win over the registry's: `path=` reads another local file in the same format
    (with `test_split_path=` if it has one), `fold=3`, `require_explanation=True`, `hub_config="pqa_artificial"`,
    `revision=`, ... The name, split and files are checked before anything is read.
    """
    benchmark = get_benchmark(name)
    split = split or benchmark.default_split
    if split not in benchmark.splits:
        raise ValueError(f"{name} has no split {split!r}; fix: use one of {', '.join(benchmark.splits)}")
    if source == "local":
        # a file of the user's own (path=...) comes with its own companions, never with the data root's
        files = {} if "path" in options else local_files(name, split, data_root)
        for key, path in files.items():
            if not path.is_file():
                raise ValueError(
                    f"{name} {split}: {path} not found; fix: set data_root (or MEDQA_DATA_ROOT) to the folder "
                    f"holding {benchmark.local_files[key].format(split=split)}, pass {key}=..., or use source=hub"
                )
        kwargs = {**benchmark.local_options, **files, **options}
    elif source == "hub":
        kwargs = {**benchmark.hub_options, **options}
    else:
        raise ValueError(f"source={source!r}; fix: use one of {', '.join(SOURCES)}")
    return benchmark.load(split, on_bad_row=on_bad_row, **kwargs)


def resolve_data_path(path: str) -> str:
    """A relative path is read from the working directory, else from the repository (its bundled data/)."""
    local = Path(path).expanduser()
    return str(local.resolve() if local.exists() or not (REPO_ROOT / path).exists() else REPO_ROOT / path)


def resolve_options(options: dict | None) -> dict:
    """A recipe's loader options with every `*path` value resolved by `resolve_data_path`."""
    return {key: resolve_data_path(value) if key.endswith("path") and isinstance(value, str) else value
            for key, value in (options or {}).items()}
