"""PubMedQA: PQA-L with the official test split and 10 folds, and PQA-A, in the reasoning-required setting.

The official split (pubmedqa/preprocess/split_dataset.py, `pqal`) seeds Python's `random` with 0, splits the 1,000
PQA-L questions in two by label -- the second half is the test set, test_ground_truth.json -- and then the first
half into 10 folds of 50. `official_pubmedqa_split` replays it call for call, so fold 0 is bigbio's
`pubmed_qa_labeled_fold0_source` (450 train / 50 dev), and a given test_ground_truth.json is checked against it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from pathlib import Path

from .records import BadRow, QAItem, QASplit, check_split, convert_rows, hub_rows, hub_source, read_json, text_field

PUBMEDQA_LABELS = ("yes", "no", "maybe")
PUBMEDQA_SPLITS = ("test", "train", "dev", "train_dev", "all")
NUM_FOLDS = 10
# sha256 of the sorted PMIDs of the official PQA-L test split: the Hub copy ships no split file, so this is how a
# Hub load proves that the replay found the official 500 (it would not if the Hub rows came in another order).
PQAL_TEST_IDS_SHA256 = "406e3b89eff577ed38571eca5a5819734a6f49ac0437d171b6c64e5c3cd195f8"


def _pubmedqa_item(pmid: str, row: Mapping) -> QAItem:
    """One row of ori_pqal.json (or ori_pqaa.json): the contexts are the abstract without its conclusion."""
    question = text_field(row, "QUESTION")
    contexts = row.get("CONTEXTS")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) and c.strip() for c in contexts):
        raise BadRow("field 'CONTEXTS' is missing or not a list of non-empty paragraphs")
    answer = text_field(row, "final_decision")
    if answer not in PUBMEDQA_LABELS:
        raise BadRow(f"final_decision {answer!r} is not one of {'/'.join(PUBMEDQA_LABELS)}")
    return QAItem(
        id=pmid,
        benchmark="pubmedqa",
        question=question,
        answer=answer,
        context="\n".join(c.strip() for c in contexts),
        meta={"long_answer": row.get("LONG_ANSWER") or "", "year": row.get("YEAR") or ""},
    )


def _ori_row_from_hub(row: Mapping) -> tuple[str, dict]:
    """qiaojin/PubMedQA's schema (pubid, question, context{contexts, ...}, long_answer, final_decision) -> ori."""
    context = row.get("context") or {}
    ori = {
        "QUESTION": row.get("question"),
        "CONTEXTS": context.get("contexts"),
        "final_decision": row.get("final_decision"),
        "LONG_ANSWER": row.get("long_answer"),
    }
    return str(row.get("pubid")), ori


def _split_by_label(items: list[QAItem], n: int, rng: random.Random, source: str) -> list[list[QAItem]]:
    """`split(dataset, n)` of the official script, with the same rng calls in the same order."""
    by_label = {label: [item for item in items if item.answer == label] for label in PUBMEDQA_LABELS}
    chunks = {}
    for label, group in by_label.items():
        rng.shuffle(group)
        size = math.ceil(len(group) / n)
        chunks[label] = [group[k * size : (k + 1) * size] if k < n - 1 else group[k * size :] for k in range(n)]
    parts = [[item for label in PUBMEDQA_LABELS for item in chunks[label][k]] for k in range(n)]
    if len(parts[-1]) != len(parts[0]):  # uneven: the official code moves one random item of each part to the last
        for part in parts[:-1]:
            if not part:
                raise ValueError(
                    f"{source}: {len(items)} questions are too few for the official {n}-way PubMedQA split; "
                    "fix: use split=all"
                )
            picked = rng.choice(part)
            part.remove(picked)
            parts[-1].append(picked)
    return parts


def official_pubmedqa_split(items: list[QAItem], source: str = "PubMedQA") -> tuple[list[QAItem], list[list[QAItem]]]:
    """(test set, 10 folds) as the official script makes them from `items` in file order.

    Fold k's dev set is fold k; its train set is the other nine folds, in order.
    """
    rng = random.Random(0)
    train_dev, test = _split_by_label(items, 2, rng, source)
    return test, _split_by_label(train_dev, NUM_FOLDS, rng, source)


def _check_test_split(test: list[QAItem], split_file: Path, source: str) -> None:
    expected = read_json(split_file)
    if not isinstance(expected, dict):
        raise ValueError(f"{split_file} is not a JSON object of PMID -> label; fix: pass a test_ground_truth file")
    replayed = {item.id: item.answer for item in test}
    if set(expected) != set(replayed):
        raise ValueError(
            f"{split_file}: the official seed-0 split of {source} gives another test set "
            f"({len(set(expected) ^ set(replayed))} PMIDs differ); fix: pass the split file of this data file, or none"
        )
    for pmid, label in expected.items():
        if replayed[pmid] != label:
            raise ValueError(
                f"{split_file}: PMID {pmid} is {label!r} there but {replayed[pmid]!r} in {source}; "
                "fix: pass the split file of this data file"
            )


def load_pubmedqa(
    split: str = "test",
    *,
    path: str | Path | None = None,
    test_split_path: str | Path | None = None,
    fold: int = 0,
    hub_id: str = "qiaojin/PubMedQA",
    hub_config: str = "pqa_labeled",
    revision: str | None = None,
    on_bad_row: str = "error",
) -> QASplit:
    """PubMedQA, reasoning-required: each item's context is the abstract without its conclusion.

    `path`: a file in the original ori_pqal.json format (dict PMID -> {QUESTION, CONTEXTS, final_decision, ...});
    without it, the rows come from the Hub (`hub_config="pqa_artificial"` with `split="all"` gives PQA-A).
    Splits: `test` (the official 500), `train` / `dev` (fold `fold` of the other 500: 450 / 50), `train_dev` (those
    500), `all` (the whole file). `test_split_path` (test_ground_truth.json) must agree with the replayed split.
    Skipped bad rows take no part in the split, so skipping changes it (and the check then says so).
    """
    check_split(split, PUBMEDQA_SPLITS, "pubmedqa")
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold={fold} is out of range; fix: use a fold from 0 to {NUM_FOLDS - 1}")
    if path is not None:
        path = Path(path)
        source, files = str(path), [path]
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object of PMID -> row; fix: pass a file in ori_pqal.json format")
        rows = [(f"{n} (PMID {pmid})", pmid, row) for n, (pmid, row) in enumerate(data.items(), start=1)]
    else:
        source, files = hub_source(hub_id, revision), []
        rows = [(n, *_ori_row_from_hub(row)) for n, row in hub_rows(hub_id, hub_config, "train", revision)]
    items, bad_rows = convert_rows(rows, _pubmedqa_item, source, on_bad_row)
    if split != "all":
        test, folds = official_pubmedqa_split(items, source)
        if test_split_path is not None:
            _check_test_split(test, Path(test_split_path), source)
            files.append(Path(test_split_path))
        elif path is None and hub_config == "pqa_labeled":
            digest = hashlib.sha256("\n".join(sorted(item.id for item in test)).encode()).hexdigest()
            if digest != PQAL_TEST_IDS_SHA256:
                raise ValueError(
                    f"{source}: the official seed-0 split of its rows is not the official test set (its rows are "
                    "not in ori_pqal.json order); fix: load the local ori_pqal.json and test_ground_truth.json"
                )
        splits = {
            "test": test,
            "dev": folds[fold],
            "train": [item for k, part in enumerate(folds) if k != fold for item in part],
            "train_dev": [item for part in folds for item in part],
        }
        items = splits[split]
    return QASplit("pubmedqa", split, items, source, files, bad_rows)
