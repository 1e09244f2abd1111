"""The multiple-choice benchmarks: MedMCQA (options A-D) and MedQA US (A-E, or A-D in the 4-option variant)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .qa_records import BadRow, QAItem, QASplit, check_split, convert_rows, hub_rows, hub_source, json_lines, text_field

MEDMCQA_OPTION_FIELDS = {"A": "opa", "B": "opb", "C": "opc", "D": "opd"}


def _rows(split: str, path: str | Path | None, hub_id: str, hub_config: str | None, revision: str | None):
    """(source, files, rows) from a local JSON-lines file, or from the Hub when there is no path."""
    if path is not None:
        return str(path), [Path(path)], json_lines(Path(path))
    hub_split = {"dev": "validation"}.get(split, split)  # the Hub copies call the dev split "validation"
    return hub_source(hub_id, revision), [], hub_rows(hub_id, hub_config, hub_split, revision)


def _medmcqa_item(row: Mapping, cop_base: int) -> QAItem:
    question = text_field(row, "question")
    options = {letter: text_field(row, key) for letter, key in MEDMCQA_OPTION_FIELDS.items()}
    cop = row.get("cop")
    if isinstance(cop, bool) or not isinstance(cop, int) or not cop_base <= cop < cop_base + 4:
        raise BadRow(
            f"cop {cop!r} is not an option number {cop_base}..{cop_base + 3}",
            fix=f"this load reads cop as {cop_base}-based (cop_base={cop_base}), but the original files are "
            "1-based and the Hub copy 0-based: set cop_base to match the file, or correct the row",
        )
    return QAItem(
        id=text_field(row, "id"),
        benchmark="medmcqa",
        question=question,
        answer="ABCD"[cop - cop_base],
        options=options,
        explanation=(row.get("exp") or "").strip(),
        subject=row.get("subject_name") or "",
        meta={"topic": row.get("topic_name") or "", "choice_type": row.get("choice_type") or ""},
    )


def load_medmcqa(
    split: str = "dev",
    *,
    cop_base: int,
    path: str | Path | None = None,
    hub_id: str = "openlifescienceai/medmcqa",
    revision: str | None = None,
    require_explanation: bool = False,
    on_bad_row: str = "error",
) -> QASplit:
    """MedMCQA from a JSON-lines file in the original format ({id, question, opa..opd, cop, exp, subject_name,
    ...}), or from the Hub when there is no `path`.

    `cop_base` is how the correct option `cop` is numbered: 1 in the original release files (and MIRAGE's
    dev.json), 0 in openlifescienceai/medmcqa. `require_explanation=True` leaves out the rows without `exp`, as
    Meditron did when it trained on explanations; `QASplit.dropped_without_explanation` counts them.
    """
    check_split(split, ("train", "dev"), "medmcqa")
    if cop_base not in (0, 1):
        raise ValueError(f"cop_base={cop_base!r}; fix: use 1 for the original files, 0 for the Hub copy")
    source, files, rows = _rows(split, path, hub_id, None, revision)
    items, bad_rows = convert_rows(
        ((n, None, row) for n, row in rows), lambda _, row: _medmcqa_item(row, cop_base), source, on_bad_row
    )
    kept = [item for item in items if item.explanation or not require_explanation]
    return QASplit("medmcqa", split, kept, source, files, bad_rows, dropped_without_explanation=len(items) - len(kept))


def _medqa_item(item_id: str, row: Mapping, benchmark: str, letters: str) -> QAItem:
    question = text_field(row, "question")
    options = row.get("options")
    if isinstance(options, list):  # bigbio/med_qa's source schema: [{key, value}, ...]
        options = {o.get("key"): o.get("value") for o in options if isinstance(o, Mapping)}
    if not isinstance(options, Mapping) or "".join(sorted(map(str, options))) != letters:
        found = "".join(sorted(map(str, options))) if isinstance(options, Mapping) else ""
        raise BadRow(f"options are {found or 'missing'}, expected {letters}")
    options = {letter: text_field(options, letter) for letter in letters}
    answer = row.get("answer_idx")
    if answer not in options:
        raise BadRow(f"answer_idx {answer!r} is not one of {', '.join(letters)}")
    gold_text = row.get("answer")
    if isinstance(gold_text, str) and gold_text.strip() != options[answer]:
        raise BadRow(f"answer text {gold_text!r} is not option {answer}")
    return QAItem(
        id=item_id,
        benchmark=benchmark,
        question=question,
        answer=answer,
        options=options,
        subject=row.get("meta_info") or "",
    )


def load_medqa(
    split: str = "test",
    *,
    num_options: int = 5,
    path: str | Path | None = None,
    hub_id: str = "bigbio/med_qa",
    hub_config: str | None = "med_qa_en_source",
    revision: str | None = None,
    on_bad_row: str = "error",
) -> QASplit:
    """MedQA US from a JSON-lines file in the original format ({question, answer, options, meta_info, answer_idx}),
    or from the Hub when there is no `path`. `num_options=4` is the 4-option variant, benchmark `medqa4`."""
    benchmark = {5: "medqa", 4: "medqa4"}.get(num_options)
    if benchmark is None:
        raise ValueError(f"num_options={num_options!r}; fix: use 5 (MedQA) or 4 (MedQA 4-option)")
    check_split(split, ("train", "dev", "test"), benchmark)
    source, files, rows = _rows(split, path, hub_id, hub_config, revision)
    letters = "ABCDE"[:num_options]
    # ids number the rows: the 5- and 4-option files list the same questions in the same order
    items, bad_rows = convert_rows(
        ((n, f"{split}-{n}", row) for n, row in rows),
        lambda item_id, row: _medqa_item(item_id, row, benchmark, letters),
        source,
        on_bad_row,
    )
    return QASplit(benchmark, split, items, source, files, bad_rows)
