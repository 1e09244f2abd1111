"""MedMCQA: Indian medical entrance-exam questions, options A-D, with explanations."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .records import BadRow, QAItem, QASplit, check_split, convert_rows, local_or_hub_rows, text_field

MEDMCQA_OPTION_FIELDS = {"A": "opa", "B": "opb", "C": "opc", "D": "opd"}


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
    source, files, rows = local_or_hub_rows(split, path, hub_id, None, revision)
    items, bad_rows = convert_rows(
        ((n, None, row) for n, row in rows), lambda _, row: _medmcqa_item(row, cop_base), source, on_bad_row
    )
    kept = [item for item in items if item.explanation or not require_explanation]
    return QASplit("medmcqa", split, kept, source, files, bad_rows, dropped_without_explanation=len(items) - len(kept))
