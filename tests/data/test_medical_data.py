"""Benchmark adapters on the real shared files, the Hub code path on local folders, and malformed rows."""

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from finetune.data.registry import (
    BENCHMARKS,
    default_data_root,
    load_benchmark,
    load_medmcqa,
    load_medqa,
    load_pubmedqa,
    official_pubmedqa_split,
)

REPO = Path(__file__).resolve().parents[2]
DATA = default_data_root()
SMOKE = REPO / "data" / "smoke_pubmedqa.json"
SMOKE_TEST_SPLIT = REPO / "data" / "smoke_pubmedqa_test_ground_truth.json"


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def local_datasets_cache(tmp_path, monkeypatch):
    """Keep what `datasets.load_dataset` builds from the test folders out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def test_default_data_root_is_shared_data_beside_the_repo(monkeypatch):
    monkeypatch.delenv("MEDQA_DATA_ROOT", raising=False)
    assert default_data_root() == REPO.parent / "shared" / "data"
    assert (default_data_root() / "README.md").is_file()
    monkeypatch.setenv("MEDQA_DATA_ROOT", "/somewhere/else")
    assert default_data_root() == Path("/somewhere/else")


# --- PubMedQA ------------------------------------------------------------------------------------------------------


def test_pubmedqa_test_split_is_the_official_500():
    split = load_benchmark("pubmedqa")
    ground_truth = json.loads((DATA / "pubmedqa" / "test_ground_truth.json").read_text())
    assert (split.split, len(split), split.skipped) == ("test", 500, 0)
    assert Counter(item.answer for item in split) == {"yes": 276, "no": 169, "maybe": 55}
    assert [item.id for item in split] == list(ground_truth)  # the replay even keeps the file's order
    assert split.files == [DATA / "pubmedqa" / "ori_pqal.json", DATA / "pubmedqa" / "test_ground_truth.json"]


def test_pubmedqa_items_are_contexts_and_question():
    ori = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text())
    item = load_benchmark("pubmedqa").items[0]
    row = ori[item.id]
    assert item.question == row["QUESTION"]
    assert item.context == "\n".join(row["CONTEXTS"])  # the abstract without its conclusion
    assert item.answer == row["final_decision"] and item.options == {}
    assert item.meta["long_answer"] == row["LONG_ANSWER"]


def test_pubmedqa_fold0_is_450_train_50_dev_from_the_other_500():
    test_ids = {item.id for item in load_benchmark("pubmedqa", "test")}
    train = load_benchmark("pubmedqa", "train")
    dev = load_benchmark("pubmedqa", "dev")
    train_ids, dev_ids = {item.id for item in train}, {item.id for item in dev}
    assert (len(train), len(dev), len(train_ids), len(dev_ids)) == (450, 50, 450, 50)
    assert not train_ids & dev_ids and not (train_ids | dev_ids) & test_ids
    assert len(train_ids | dev_ids | test_ids) == 1000
    # the folds split each label evenly, as the official split does
    assert Counter(item.answer for item in dev) == {"yes": 27, "no": 17, "maybe": 6}
    _, folds = official_pubmedqa_split(load_benchmark("pubmedqa", "all").items)
    assert [len(fold) for fold in folds] == [50] * 10 and len({item.id for fold in folds for item in fold}) == 500
    assert [item.id for item in load_benchmark("pubmedqa", "dev", fold=9)] == [item.id for item in folds[9]]
    assert {item.id for item in load_benchmark("pubmedqa", "train_dev")} == train_ids | dev_ids


def test_pubmedqa_split_file_that_does_not_match_is_refused(tmp_path):
    ground_truth = json.loads((DATA / "pubmedqa" / "test_ground_truth.json").read_text())
    train_pmid = load_benchmark("pubmedqa", "train").items[0].id
    wrong = dict(list(ground_truth.items())[1:]) | {train_pmid: "yes"}
    split_file = tmp_path / "test_ground_truth.json"
    split_file.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match=rf"^{split_file}: the official seed-0 split .* \(2 PMIDs differ\); fix: "):
        load_benchmark("pubmedqa", test_split_path=split_file)
    relabelled = dict(ground_truth) | {next(iter(ground_truth)): "maybe"}
    split_file.write_text(json.dumps(relabelled))
    with pytest.raises(ValueError, match=rf"PMID {next(iter(ground_truth))} is 'maybe' there but 'yes'"):
        load_benchmark("pubmedqa", test_split_path=split_file)


def test_smoke_sample_loads_with_the_same_adapter():
    sample = json.loads(SMOKE.read_text())
    real = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text())
    assert 50 <= len(sample) <= 60 and not set(sample) & set(real)
    assert not {row["QUESTION"] for row in sample.values()} & {row["QUESTION"] for row in real.values()}
    kwargs = {"path": SMOKE, "test_split_path": SMOKE_TEST_SPLIT}
    assert Counter(item.answer for item in load_pubmedqa("all", **kwargs)) == {"yes": 20, "no": 20, "maybe": 20}
    test = load_pubmedqa("test", **kwargs)
    assert Counter(item.answer for item in test) == {"yes": 10, "no": 10, "maybe": 10}
    assert [item.id for item in test] == list(json.loads(SMOKE_TEST_SPLIT.read_text()))
    assert (len(load_pubmedqa("train", **kwargs)), len(load_pubmedqa("dev", **kwargs))) == (27, 3)
    # through the registry, a file of one's own takes no companion file from the data root
    assert len(load_benchmark("pubmedqa", "train", path=SMOKE)) == 27


def test_pubmedqa_from_a_hub_layout_folder(tmp_path, local_datasets_cache):
    """The Hub code path (datasets.load_dataset with qiaojin/PubMedQA's schema), on a local folder in its layout."""
    ori = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text())
    rows = [
        {
            "pubid": int(pmid),
            "question": row["QUESTION"],
            "context": {"contexts": row["CONTEXTS"], "labels": row["LABELS"], "meshes": row["MESHES"]},
            "long_answer": row["LONG_ANSWER"],
            "final_decision": row["final_decision"],
        }
        for pmid, row in ori.items()
    ]
    # the dataset card's YAML that declares the config, as on the Hub
    configs = "---\nconfigs:\n- config_name: pqa_labeled\n  data_files:\n  - {split: train, path: pqa_labeled/*}\n---\n"

    def hub_folder(name, rows):
        folder = tmp_path / name
        (folder / "pqa_labeled").mkdir(parents=True)
        (folder / "README.md").write_text(configs)
        datasets.Dataset.from_list(rows).to_parquet(folder / "pqa_labeled" / "train-00000-of-00001.parquet")
        return str(folder)

    from_hub = load_benchmark("pubmedqa", "test", source="hub", hub_id=hub_folder("in_order", rows))
    assert [item.id for item in from_hub] == [item.id for item in load_benchmark("pubmedqa", "test")]
    assert from_hub.items[0].context == load_benchmark("pubmedqa", "test").items[0].context
    with pytest.raises(ValueError, match="not the official test set"):
        load_benchmark("pubmedqa", "test", source="hub", hub_id=hub_folder("reversed", rows[::-1]))


# --- MedMCQA -------------------------------------------------------------------------------------------------------


def test_medmcqa_dev_reads_cop_one_based():
    raw = read_lines(DATA / "medmcqa" / "dev.json")
    split = load_benchmark("medmcqa", "dev")
    assert len(split) == 4183 and {item.answer for item in split} == set("ABCD")
    assert [item.answer for item in split] == ["ABCD"[row["cop"] - 1] for row in raw]
    first = split.items[0]
    assert first.options == {"A": raw[0]["opa"], "B": raw[0]["opb"], "C": raw[0]["opc"], "D": raw[0]["opd"]}
    assert (first.id, first.subject, first.explanation) == (raw[0]["id"], "Physiology", "")


def test_medmcqa_require_explanation_drops_rows_without_one():
    split = load_benchmark("medmcqa", "dev", require_explanation=True)
    assert (len(split), split.dropped_without_explanation, split.skipped) == (4183 - 1977, 1977, 0)
    assert all(item.explanation for item in split)


def test_medmcqa_wrong_cop_base_names_the_row_and_the_fix():
    path = DATA / "medmcqa" / "dev.json"
    first_cop_4 = next(n for n, row in enumerate(read_lines(path), start=1) if row["cop"] == 4)
    expected = rf"^{path} row {first_cop_4}: cop 4 is not an option number 0\.\.3; fix: .*set cop_base to match"
    with pytest.raises(ValueError, match=expected):
        load_medmcqa("dev", path=path, cop_base=0)


def test_medmcqa_from_a_hub_layout_folder_is_zero_based(tmp_path, local_datasets_cache):
    raw = read_lines(DATA / "medmcqa" / "dev.json")[:200]
    hub_rows = [row | {"cop": row["cop"] - 1} for row in raw]  # openlifescienceai/medmcqa numbers cop from 0
    (tmp_path / "medmcqa" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(hub_rows).to_parquet(tmp_path / "medmcqa" / "data" / "validation-00000-of-00001.parquet")
    split = load_benchmark("medmcqa", "dev", source="hub", hub_id=str(tmp_path / "medmcqa"))
    assert split.source == f"hf://datasets/{tmp_path / 'medmcqa'}" and split.files == []
    assert [item.answer for item in split] == ["ABCD"[row["cop"] - 1] for row in raw]


# --- MedQA ---------------------------------------------------------------------------------------------------------


def test_medqa_test_in_both_option_counts():
    five, four = load_benchmark("medqa"), load_benchmark("medqa4")
    assert (len(five), len(four)) == (1273, 1273)
    assert all(list(item.options) == list("ABCDE") for item in five)
    assert all(list(item.options) == list("ABCD") for item in four)
    assert [item.id for item in five] == [item.id for item in four] == [f"test-{n}" for n in range(1, 1274)]
    assert [item.question for item in five] == [item.question for item in four]
    raw = read_lines(DATA / "medqa" / "US" / "test.jsonl")
    assert [item.options[item.answer] for item in five] == [row["answer"].strip() for row in raw]
    assert Counter(item.subject for item in four) == {"step1": 679, "step2&3": 594}


def test_medqa_reads_the_bigbio_option_list_schema(tmp_path):
    row = read_lines(DATA / "medqa" / "US" / "test.jsonl")[0]
    bigbio_row = row | {"options": [{"key": k, "value": v} for k, v in row["options"].items()]}
    split = load_medqa("test", path=write_lines(tmp_path / "bigbio.jsonl", [bigbio_row]))
    assert split.items[0].options == row["options"] and split.items[0].answer == row["answer_idx"]


# --- malformed rows ------------------------------------------------------------------------------------------------

MEDMCQA_ROW = {"id": "x1", "question": "Which vitamin?", "opa": "A1", "opb": "B12", "opc": "C", "opd": "D3", "cop": 2}
MEDQA_ROW = {
    "question": "Which drug?",
    "answer": "Aspirin",
    "options": {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Clopidogrel"},
    "answer_idx": "A",
    "meta_info": "step1",
}


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        ({k: v for k, v in MEDMCQA_ROW.items() if k != "opc"}, "field 'opc' is missing or empty"),
        (MEDMCQA_ROW | {"question": "  "}, "field 'question' is missing or empty"),
        (MEDMCQA_ROW | {"cop": 7}, r"cop 7 is not an option number 1\.\.4"),
        ('{"id": "x2", "question": ', r"is not valid JSON \(Expecting value\)"),
    ],
)
def test_malformed_medmcqa_row_names_file_and_row(tmp_path, bad_row, problem):
    path = write_lines(tmp_path / "dev.json", [MEDMCQA_ROW, bad_row, MEDMCQA_ROW | {"id": "x3"}])
    with pytest.raises(ValueError, match=rf"^{path} row 2: {problem}; fix: "):
        load_medmcqa("dev", path=path, cop_base=1)
    split = load_medmcqa("dev", path=path, cop_base=1, on_bad_row="skip")
    assert [item.id for item in split] == ["x1", "x3"] and split.skipped == 1
    assert split.bad_rows[0].startswith(f"{path} row 2: ")


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        (MEDQA_ROW | {"answer_idx": "E"}, "answer_idx 'E' is not one of A, B, C, D"),
        ({k: v for k, v in MEDQA_ROW.items() if k != "options"}, "options are missing, expected ABCD"),
        (MEDQA_ROW | {"options": MEDQA_ROW["options"] | {"E": "Heparin"}}, "options are ABCDE, expected ABCD"),
        (MEDQA_ROW | {"answer": "Heparin"}, "answer text 'Heparin' is not option A"),
    ],
)
def test_malformed_medqa_row_names_file_and_row(tmp_path, bad_row, problem):
    path = write_lines(tmp_path / "phrases_no_exclude_test.jsonl", [MEDQA_ROW, MEDQA_ROW, bad_row])
    with pytest.raises(ValueError, match=rf"^{path} row 3: {problem}; fix: "):
        load_medqa("test", path=path, num_options=4)
    split = load_medqa("test", path=path, num_options=4, on_bad_row="skip")
    assert [item.id for item in split] == ["test-1", "test-2"] and split.skipped == 1


def test_malformed_pubmedqa_rows_are_skipped_and_counted(tmp_path):
    sample = json.loads(SMOKE.read_text())
    pmids = list(sample)
    sample[pmids[1]]["final_decision"] = "Yes"
    del sample[pmids[4]]["CONTEXTS"]
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps(sample))
    with pytest.raises(ValueError, match=rf"^{path} row 2 \(PMID {pmids[1]}\): final_decision 'Yes' is not one"):
        load_pubmedqa("all", path=path)
    split = load_pubmedqa("all", path=path, on_bad_row="skip")
    assert (len(split), split.skipped) == (58, 2)
    assert f"row 5 (PMID {pmids[4]}): field 'CONTEXTS' is missing" in split.bad_rows[1]


# --- the registry --------------------------------------------------------------------------------------------------


def test_registry_names_and_errors(tmp_path):
    assert list(BENCHMARKS) == ["pubmedqa", "medmcqa", "medqa", "medqa4"]
    with pytest.raises(ValueError, match="^unknown benchmark 'mmlu'; fix: use one of pubmedqa, medmcqa, medqa, medqa4"):
        load_benchmark("mmlu")
    with pytest.raises(ValueError, match="^medmcqa has no split 'test'; fix: use one of train, dev$"):
        load_benchmark("medmcqa", "test")
    missing = tmp_path / "medqa" / "US" / "4_options" / "phrases_no_exclude_train.jsonl"
    with pytest.raises(ValueError, match=rf"^medqa4 train: {missing} not found; fix: set data_root"):
        load_benchmark("medqa4", "train", data_root=tmp_path)
    with pytest.raises(ValueError, match="^on_bad_row='ignore' is not one of error, skip"):
        load_benchmark("medqa", on_bad_row="ignore")
    with pytest.raises(ValueError, match="^source='s3'"):
        load_benchmark("medqa", source="s3")
