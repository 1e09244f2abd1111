"""The record every benchmark adapter returns, and the row-reading toolkit the adapters share.

A bad row (missing field, empty question, unknown answer key, a line that is not JSON) raises a one-line
`ValueError` naming the file, the row and the fix -- or, with `on_bad_row="skip"`, is dropped and its message kept in
`QASplit.bad_rows`, so that a run's report can count and show what was skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BAD_ROW_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class QAItem:
    """One benchmark question, whatever its source."""

    id: str  # PubMedQA PMID, MedMCQA id, MedQA "<split>-<line>" (the same in the 5- and 4-option files)
    benchmark: str  # pubmedqa | medmcqa | medqa | medqa4
    question: str
    answer: str  # option letter (A-E), or yes / no / maybe for PubMedQA
    options: dict[str, str] = field(default_factory=dict)  # letter -> option text; empty for PubMedQA
    context: str = ""  # PubMedQA: the abstract without its conclusion, one paragraph per line
    explanation: str = ""  # MedMCQA `exp`; "" where the row has none
    subject: str = ""  # MedMCQA subject_name; MedQA USMLE step (meta_info); "" for PubMedQA
    meta: dict[str, Any] = field(default_factory=dict)  # source-specific extras (topic, long answer, ...)


@dataclass
class QASplit:
    """The items of one benchmark split, where they came from and what was left out."""

    benchmark: str
    split: str
    items: list[QAItem]
    source: str  # the local file, or hf://datasets/<id>[@revision]
    files: list[Path] = field(default_factory=list)  # local files read, for a manifest's hashes
    bad_rows: list[str] = field(default_factory=list)  # one error message per skipped row (on_bad_row="skip")
    dropped_without_explanation: int = 0  # MedMCQA rows left out by require_explanation=True

    @property
    def skipped(self) -> int:
        return len(self.bad_rows)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[QAItem]:
        return iter(self.items)


class BadRow(Exception):
    """Raised by a row converter; `convert_rows` turns it into the one-line error (or a skip)."""

    def __init__(self, problem: str, fix: str = "correct or remove that row, or load with on_bad_row=skip"):
        super().__init__(problem)
        self.fix = fix


def convert_rows(
    rows: Iterable[tuple[int | str, Any, Any]], convert: Callable[[Any, Mapping], QAItem], source: str, on_bad_row: str
) -> tuple[list[QAItem], list[str]]:
    """`convert(key, row)` for each (row number, key, row): the items, and the messages of the rows skipped."""
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not one of {', '.join(BAD_ROW_POLICIES)}; fix: use one")
    items, bad_rows = [], []
    for row_number, key, row in rows:
        try:
            if isinstance(row, BadRow):  # a line that was not even JSON
                raise row
            if not isinstance(row, Mapping):
                raise BadRow(f"is a {type(row).__name__}, not a JSON object")
            items.append(convert(key, row))
        except BadRow as bad:
            message = f"{source} row {row_number}: {bad}; fix: {bad.fix}"
            if on_bad_row == "error":
                raise ValueError(message) from None
            bad_rows.append(message)
    return items, bad_rows


def text_field(row: Mapping, key: str) -> str:
    """The stripped, non-empty string `row[key]`."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"field {key!r} is missing or empty")
    return value.strip()


def check_split(split: str, splits: Iterable[str], benchmark: str) -> None:
    if split not in splits:
        raise ValueError(f"{benchmark} has no split {split!r}; fix: use one of {', '.join(splits)}")


def _missing(path: Path) -> ValueError:
    return ValueError(f"{path} not found; fix: pass the right path, or set data_root (or MEDQA_DATA_ROOT)")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _missing(path) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix: restore the original file") from None


def json_lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, row) for each non-blank line; a line that is not JSON comes back as a BadRow."""
    if not path.is_file():
        raise _missing(path)
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    rows.append((number, BadRow(f"is not valid JSON ({error.msg})")))
    return rows


def hub_rows(hub_id: str, config: str | None, split: str, revision: str | None) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a Hub dataset split, through `datasets.load_dataset` (a local folder works too)."""
    import datasets

    try:
        rows = datasets.load_dataset(hub_id, config, split=split, revision=revision)
    except Exception as error:  # whatever fails in fetching or building, the user gets one line and a fix
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"could not load {hub_id} (config {config}, split {split}) through datasets: {cause}; "
            "fix: check the id, revision and network, or use the local files (source=local)"
        ) from error
    return enumerate(rows, start=1)


def hub_source(hub_id: str, revision: str | None) -> str:
    return f"hf://datasets/{hub_id}" + (f"@{revision}" if revision else "")


def local_or_hub_rows(split: str, path: str | Path | None, hub_id: str, hub_config: str | None, revision: str | None):
    """(source, files, rows) from a local JSON-lines file, or from the Hub when there is no path."""
    if path is not None:
        return str(path), [Path(path)], json_lines(Path(path))
    hub_split = {"dev": "validation"}.get(split, split)  # the Hub copies call the dev split "validation"
    return hub_source(hub_id, revision), [], hub_rows(hub_id, hub_config, hub_split, revision)
