"""Comparisons on a constructed case whose numbers are known by hand: two training runs that differ in lora.r,
the base model and both adapters evaluated on the same 12 questions, written in the formats train.py and
evaluate.py write. (tests/training/test_sweep.py compares real SmolLM2 runs end to end.)"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config.recipe import compose_recipe
from finetune.evaluation.benchmarks import EvalError, benchmark_specs
from finetune.evaluation.compare import compare, mcnemar_exact
from finetune.evaluation.harness import summarise
from finetune.evaluation.report import write_json, write_predictions
from finetune.training.run_report import save_config

REPO = Path(__file__).resolve().parents[2]

# question -> (gold, base's answer, r8's answer, r16's answer). r8 answers "yes" to everything: right on the 9 "yes"
# questions; the base is right on 4. Against the base, r8: both right 3, only r8 6, only the base 1, neither 2;
# r16: both right 4, only r16 2 (q10, q11), only the base 0.
QUESTIONS = {**{f"q{i}": ("yes", "yes", "yes", "yes") for i in range(3)},
             **{f"q{i}": ("yes", "no", "yes", "no") for i in range(3, 9)},
             "q9": ("no", "no", "yes", "no"),
             "q10": ("maybe", "no", "yes", "maybe"), "q11": ("maybe", "no", "yes", "maybe")}


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 6) == mcnemar_exact(6, 1) == 2 * (1 + 7) / 2 ** 7  # 0.125
    assert mcnemar_exact(0, 5) == 2 / 2 ** 5
    assert mcnemar_exact(3, 3) == 1.0


def write_run(run_dir: Path, r: int, losses: list[float]) -> None:
    run_dir.mkdir(parents=True)
    save_config(compose_recipe("smoke", [f"lora.r={r}", f"output_dir={run_dir}"]), run_dir, f"train lora.r={r}")
    (run_dir / "adapter").mkdir()
    metrics = {"loss": [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def write_evaluation(out: Path, column: int, adapter: Path | None) -> None:
    """An evaluation's files as evaluate.py writes them, with this column's answers."""
    spec = benchmark_specs()["pubmedqa"]
    records = [{"benchmark": "pubmedqa", "id": q, "group": None, "answer": row[column], "gold": row[0],
                "correct": row[column] == row[0], "choices": ["yes", "no", "maybe"]} for q, row in QUESTIONS.items()]
    out.mkdir(parents=True)
    cfg = compose_recipe("smoke", [f"output_dir={out}", f"adapter={adapter}" if adapter else "adapter=null",
                                   "eval.benchmarks=[pubmedqa]", "eval.limit=12"])
    (out / "eval_config.yaml").write_text(OmegaConf.to_yaml(cfg))
    write_predictions(out / "predictions.jsonl", records)
    write_json(out / "manifest.json", {"adapter": {"given": str(adapter), "path": str(adapter / "adapter")}
                                       if adapter else None})
    write_json(out / "summary.json", {"pubmedqa": summarise(records, spec, "generate")})


@pytest.fixture
def constructed(tmp_path) -> Path:
    write_run(tmp_path / "runs" / "r8", 8, [2.0, 1.2, 1.5])
    write_run(tmp_path / "runs" / "r16", 16, [2.1, 1.9, 1.7])
    evals = tmp_path / "evals"
    write_evaluation(evals / "r8", 2, tmp_path / "runs" / "r8")  # given first: the base is the reference anyway
    write_evaluation(evals / "base", 1, None)
    write_evaluation(evals / "r16", 3, tmp_path / "runs" / "r16")
    return tmp_path


def test_compare_reports_settings_accuracies_and_the_paired_test(constructed):
    out = constructed / "cmp"
    result = subprocess.run([sys.executable, str(REPO / "finetune" / "compare.py"), str(constructed / "evals"),
                             "--output", str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["run"]: row for row in csv.DictReader((out / "comparison.csv").open())}
    assert list(rows) == ["base", "r16", "r8"]  # the base model first: the reference
    assert {run: row["lora.r"] for run, row in rows.items()} == {"base": "–", "r16": "16", "r8": "8"}
    assert (rows["r8"]["final_loss"], rows["r8"]["best_loss"]) == ("1.5", "1.2")
    accuracy = {run: float(row["pubmedqa.accuracy"]) for run, row in rows.items()}
    assert accuracy == {"base": 4 / 12, "r8": 9 / 12, "r16": 6 / 12}
    assert rows["r8"]["pubmedqa.answers"] == "yes=1.0000"
    assert rows["base"]["pubmedqa.answers"] == "yes=0.2500;no=0.7500"
    # r8 vs the base: only r8 right on 6 questions, only the base on 1 -> 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    assert (rows["r8"]["pubmedqa.wins_vs_reference"], rows["r8"]["pubmedqa.losses_vs_reference"]) == ("6", "1")
    assert float(rows["r8"]["pubmedqa.p_vs_reference"]) == 0.125
    # r16 vs the base: 2 wins, no loss -> 2 * C(2,0) / 2^2 = 0.5
    assert (rows["r16"]["pubmedqa.wins_vs_reference"], rows["r16"]["pubmedqa.losses_vs_reference"]) == ("2", "0")
    assert float(rows["r16"]["pubmedqa.p_vs_reference"]) == 0.5
    table = (out / "comparison.md").read_text()
    assert "| r8 | 12 | 75.0 (46.8–91.1) | yes 100% | 6 / 1 | 0.125 |" in table
    assert 'chance 33.3%, majority class "yes" 75.0%, Meditron-70B (paper) 81.6%' in table
    assert "| run | adapter | lora.r | final loss | best loss |" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 compared" in result.stdout


def test_a_run_and_its_evaluation_are_one_row_and_bad_folders_fail_in_one_line(constructed, tmp_path):
    entries = compare([constructed / "runs", constructed / "evals" / "r8"], tmp_path / "cmp")
    assert [e.label for e in entries] == ["runs/r16", "evals/r8"]  # runs/r8 is the run evals/r8 evaluated
    assert entries[1].losses == [(1, 2.0), (2, 1.2), (3, 1.5)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match=r"empty holds no run or evaluation .*; pass a training run"):
        compare([tmp_path / "empty"], tmp_path / "cmp")
    with pytest.raises(EvalError, match="nowhere: no such directory"):
        compare([tmp_path / "nowhere"], tmp_path / "cmp")


def test_accuracy_chart_draws_the_reference_lines_and_wraps_a_long_title():
    from matplotlib.figure import Figure

    from finetune.evaluation.report import draw_accuracy, wrapped_title
    spec = benchmark_specs()["pubmedqa"]
    summaries = {}
    for label, answer in (("base", "no"), ("tuned", "yes")):
        records = [{"answer": answer, "gold": gold, "correct": gold == answer, "choices": ["yes", "no", "maybe"]}
                   for gold, *_ in QUESTIONS.values()]
        summaries[label] = {"pubmedqa": summarise(records, spec, "generate")}
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    draw_accuracy(ax, summaries, base="base")
    levels = {c.get_label(): c.get_segments()[0][0][1] for c in ax.collections if not c.get_label().startswith("_")}
    assert levels == pytest.approx({"chance": 100 / 3, "majority class": 75.0, "base model": 100 / 12,
                                    "Meditron-70B (paper)": 81.6})
    title = wrapped_title(fig, "smollm2 + " + "/very/long/path" * 10)
    assert max(map(len, title.splitlines())) <= 66 and title.replace("\n", "") == "smollm2 + " + "/very/long/path" * 10
