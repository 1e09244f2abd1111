"""MedQA US: USMLE-style questions, options A-E, or A-D in the 4-option variant (benchmark `medqa4`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .records import BadRow, QAItem, QASplit, check_split, convert_rows, local_or_hub_rows, text_field


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
    source, files, rows = local_or_hub_rows(split, path, hub_id, hub_config, revision)
    letters = "ABCDE"[:num_options]
    # ids number the rows: the 5- and 4-option files list the same questions in the same order
    items, bad_rows = convert_rows(
        ((n, f"{split}-{n}", row) for n, row in rows),
        lambda item_id, row: _medqa_item(item_id, row, benchmark, letters),
        source,
        on_bad_row,
    )
    return QASplit(benchmark, split, items, source, files, bad_rows)
