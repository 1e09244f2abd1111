"""Training runs, evaluations and sweeps side by side, and whether a difference is more than noise:

    comparison.md   the settings that differ, final and best training loss; per benchmark each one's accuracy
                    (95% Wilson interval), how often it chose each answer, and McNemar's exact test against the
                    reference on the questions both answered
    comparison.csv  the same, one row per run or evaluation
    comparison.png  accuracy per benchmark with lines for chance, the majority class, the base model and the paper;
                    the training loss curves beside it

A folder is a training run (config.yaml, metrics.json), an evaluation (summary.json, predictions.jsonl; inside a
run's folder or its own), or a folder of them (a sweep, or an `adapter=[...]` evaluation), which stands for each
one in it. An evaluation of a run's adapter gets that run's settings and loss from the run's folder. The
reference is the base model's evaluation where there is one, else the first folder given.
"""

import csv
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from ..config.files import write_atomic
from .benchmarks import EvalError
from .report import draw_accuracy, reference_rates, short_label, wrapped_title

COMPARISON_FILES = ("comparison.md", "comparison.csv", "comparison.png")
NOT_SETTINGS = ("output_dir", "resume")  # differ between any two runs without changing what they compute


@dataclass
class Entry:
    """One run or evaluation: its settings (dotted keys), training loss, summary.json and predictions."""

    label: str
    path: Path
    settings: dict = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    summary: dict = field(default_factory=dict)  # benchmark -> summary.json's entry
    records: dict = field(default_factory=dict)  # benchmark -> {question id: prediction record}
    is_base: bool = False  # an evaluation of the base model alone
    run_dir: Path | None = None  # the training run it is, or whose adapter it evaluated


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar test: under "no difference", each question that exactly one of two evaluations got
    right is equally likely to be either's, so the smaller count is a Binomial(wins + losses, 1/2) tail."""
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def is_result(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / "summary.json").is_file()


def results_in(folder: Path, depth: int = 2) -> list[Path]:
    """The runs and evaluations in a folder and in its folders (a sweep's finished runs in the order of its
    sweep.json)."""
    if is_result(folder):
        return [folder]
    if depth == 0:
        return []
    runs = json.loads((folder / "sweep.json").read_text())["runs"] if (folder / "sweep.json").is_file() else []
    failed = {run["name"] for run in runs if run["status"] != "ok"}  # a failed run's folder may hold some loss
    names = [n for n in dict.fromkeys([*(run["name"] for run in runs), *sorted(p.name for p in folder.iterdir()
                                                                               if p.is_dir())]) if n not in failed]
    return [found for name in names if (folder / name).is_dir() for found in results_in(folder / name, depth - 1)]


def result_folders(paths: list[Path]) -> list[Path]:
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise EvalError(f"{path}: no such directory; pass training runs, evaluations or folders of them")
        inner = results_in(path)
        if not inner:
            raise EvalError(f"{path} holds no run or evaluation (metrics.json or summary.json, in it or in its "
                            "folders); pass a training run, an evaluation, or a folder of them")
        found += inner
    return list(dict.fromkeys(p.resolve() for p in found))


def flatten(container, prefix: str = "") -> dict:
    """{"lora.r": 8, "lora.target_modules": "[q_proj,v_proj]", ...}: the comparable values of a config."""
    flat = {}
    for key, value in container.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = f"[{','.join(map(str, value))}]" if isinstance(value, list) else value
    return flat


def load_config(path: Path) -> dict | None:
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None


def load_entry(path: Path, label: str) -> Entry:
    entry = Entry(label, path, run_dir=path)
    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
    adapter = manifest.get("adapter")
    if not (path / "config.yaml").is_file() and adapter and Path(adapter["path"]).name == "adapter":
        entry.run_dir = Path(adapter["path"]).parent.resolve()  # an evaluation of a run's adapter: the run's settings
    run_dir = entry.run_dir
    run_config, eval_config = load_config(run_dir / "config.yaml"), load_config(path / "eval_config.yaml")
    if run_config:
        entry.settings.update(flatten(run_config))
    if eval_config:
        entry.settings.update({k: v for k, v in flatten(eval_config).items()
                               if k.startswith(("model.", "eval.", "data.system_prompt"))})
        entry.settings["adapter"] = adapter["given"] if adapter else eval_config.get("adapter")
        entry.is_base = entry.settings["adapter"] is None and run_config is None
    for key in NOT_SETTINGS:
        entry.settings.pop(key, None)
    if (run_dir / "metrics.json").is_file():
        entry.losses = [(e["step"], e["loss"]) for e in json.loads((run_dir / "metrics.json").read_text())["loss"]]
    if (path / "summary.json").is_file():
        entry.summary = json.loads((path / "summary.json").read_text())
        for line in (path / "predictions.jsonl").read_text().splitlines():
            record = json.loads(line)
            entry.records.setdefault(record["benchmark"], {})[record["id"]] = record
        for name, records in entry.records.items():  # evaluations written before summary.json carried them
            entry.summary[name] = {**reference_rates(list(records.values())), **entry.summary[name]}
    return entry


def load_entries(paths: list[Path]) -> list[Entry]:
    """The entries, labelled by their path below the folder they share, the reference first; a run and an
    evaluation of its adapter are one entry (the evaluation carries the run's settings and loss)."""
    entries = [load_entry(p, p.name) for p in result_folders(paths)]
    evaluated_runs = {e.run_dir for e in entries if e.summary and e.run_dir != e.path}
    entries = [e for e in entries if e.summary or e.path not in evaluated_runs]
    common = Path(os.path.commonpath([e.path for e in entries])) if len(entries) > 1 else entries[0].path.parent
    for e in entries:
        e.label = e.path.relative_to(common).as_posix()
    return sorted(entries, key=lambda e: not e.is_base)  # stable: otherwise in the order given


def differing_settings(entries: list[Entry]) -> list[str]:
    """Keys whose value differs between the entries that have them (a base model has no lora.r)."""
    keys = dict.fromkeys(k for e in entries for k in e.settings)
    return [k for k in keys if len({json.dumps(e.settings[k], default=str) for e in entries if k in e.settings}) > 1]


def answer_shares(records: list[dict]) -> dict[str, float]:
    """How often each answer was chosen (unparseable as None), in the order of the questions' choices."""
    counts = Counter(r["answer"] for r in records)
    order = list(dict.fromkeys([*(records[0].get("choices") or []), *sorted(counts, key=str)])) if records else []
    return {answer: counts[answer] / len(records) for answer in order if counts[answer]}


def paired(entry: Entry, reference: Entry, benchmark: str) -> dict | None:
    """Questions both answered: how many only `entry` got right (wins), only the reference (losses), McNemar's p."""
    mine, theirs = entry.records.get(benchmark, {}), reference.records.get(benchmark, {})
    shared = [q for q in mine if q in theirs]
    if entry is reference or not shared:
        return None
    wins = sum(mine[q]["correct"] and not theirs[q]["correct"] for q in shared)
    losses = sum(theirs[q]["correct"] and not mine[q]["correct"] for q in shared)
    return {"questions": len(shared), "wins": wins, "losses": losses, "p": mcnemar_exact(wins, losses)}


def fmt(value) -> str:
    return "null" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def shares_text(shares: dict[str, float]) -> str:
    return " · ".join(f"{'unparseable' if a is None else a} {100 * s:.0f}%" for a, s in shares.items())


def comparison_rows(entries: list[Entry]) -> tuple[list[str], list[str], list[dict]]:
    """(differing keys, benchmarks, one row per entry) with everything the table and the CSV show."""
    keys = differing_settings(entries)
    benchmarks = list(dict.fromkeys(b for e in entries for b in e.summary))
    rows = []
    for e in entries:
        row = {"run": e.label, "path": str(e.path), **{k: fmt(e.settings.get(k, "–")) for k in keys},
               "final_loss": e.losses[-1][1] if e.losses else None,
               "best_loss": min(loss for _, loss in e.losses) if e.losses else None}
        for b in benchmarks:
            s = e.summary.get(b)
            if s is None:
                continue
            test = paired(e, entries[0], b)
            row.update({f"{b}.n": s["n"], f"{b}.accuracy": s["accuracy"], f"{b}.ci95_low": s["ci95"][0],
                        f"{b}.ci95_high": s["ci95"][1],
                        f"{b}.answers": answer_shares(list(e.records.get(b, {}).values())),
                        **({f"{b}.{k}_vs_reference": v for k, v in test.items()} if test else {})})
        rows.append(row)
    return keys, benchmarks, rows


def markdown(entries: list[Entry]) -> str:
    keys, benchmarks, rows = comparison_rows(entries)
    reference = entries[0]
    lines = [f"# Comparison of {len(entries)} runs and evaluations", "",
             (f"Reference: `{reference.label}`{' (the base model)' if reference.is_base else ''}. Paired test: "
              "McNemar's exact test on the questions both answered (two-sided; wins / losses: questions only this "
              "one / only the reference got right). p-values are not corrected for comparing several runs."), "",
             "## Settings that differ and training loss", "",
             "| run | " + " | ".join(keys) + (" | " if keys else "") + "final loss | best loss |",
             "|---|" + "---|" * len(keys) + "---:|---:|"]
    for row in rows:
        losses = [f"{row[k]:.4f}" if row[k] is not None else "–" for k in ("final_loss", "best_loss")]
        lines.append(f"| {row['run']} | " + "".join(f"{row[k]} | " for k in keys) + " | ".join(losses) + " |")
    for b in benchmarks:
        s = next(e.summary[b] for e in entries if b in e.summary)
        majority = s.get("majority") or {}
        refs = [f"chance {100 * s['chance']:.1f}%" if s.get("chance") is not None else None,
                f"majority class \"{majority['answer']}\" {100 * majority['rate']:.1f}%" if majority.get("rate")
                is not None else None,
                f"Meditron-70B (paper) {s['paper']:.1f}%" if s.get("paper") is not None else None]
        lines += ["", f"## {b}: {s.get('title', b)} ({s.get('split', '?')})", "",
                  "Reference lines: " + ", ".join(r for r in refs if r) + ".", "",
                  "| run | questions | accuracy (95% CI) | answers chosen | wins / losses vs reference | p |",
                  "|---|---:|---:|---|---:|---:|"]
        for row in rows:
            if f"{b}.n" not in row:
                continue
            acc, low, high = (100 * row[f"{b}.{k}"] for k in ("accuracy", "ci95_low", "ci95_high"))
            test = f"{row[f'{b}.wins_vs_reference']} / {row[f'{b}.losses_vs_reference']} | " \
                   f"{row[f'{b}.p_vs_reference']:.3g}" if f"{b}.p_vs_reference" in row else "– | –"
            lines.append(f"| {row['run']} | {row[f'{b}.n']} | {acc:.1f} ({low:.1f}–{high:.1f}) | "
                         f"{shares_text(row[f'{b}.answers'])} | {test} |")
    return "\n".join(lines) + "\n"


def csv_text(entries: list[Entry]) -> str:
    _, _, rows = comparison_rows(entries)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ";".join(f"{a}={s:.4f}" for a, s in v.items()) if isinstance(v, dict) else v
                         for k, v in row.items()})
    return out.getvalue()


def plot(entries: list[Entry], path: Path) -> None:
    """Accuracy per benchmark (where evaluated) and the training loss curves (where trained), side by side."""
    evaluated = {e.label: e.summary for e in entries if e.summary}
    trained = [e for e in entries if e.losses]
    panels = bool(evaluated) + bool(trained)
    fig = Figure(figsize=(6.5 * panels + 1, 4.5), dpi=100)
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if evaluated:
        base = next((e.label for e in entries if e.is_base), None)
        draw_accuracy(axes.pop(0), evaluated, base)
    if trained:
        ax = axes.pop(0)
        for e in trained:
            ax.plot([s for s, _ in e.losses], [loss for _, loss in e.losses], label=short_label(e.label))
        ax.set(xlabel="step", ylabel="training loss (answer tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(wrapped_title(fig, f"{len(entries)} runs compared, reference {entries[0].label}"), fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png"))


def compare(paths: list[Path], out_dir: Path) -> list[Entry]:
    """comparison.md, .csv and .png of the runs and evaluations in `paths`, into out_dir; returns the entries."""
    entries = load_entries(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "comparison.md", lambda p: p.write_text(markdown(entries)))
    write_atomic(out_dir / "comparison.csv", lambda p: p.write_text(csv_text(entries)))
    plot(entries, out_dir / "comparison.png")
    return entries
