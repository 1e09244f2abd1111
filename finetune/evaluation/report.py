"""What an evaluation leaves in its output directory, each file written whole or not at all (temp path + rename):

    eval_config.yaml   the resolved recipe (not config.yaml: output_dir may be the training run's own folder)
    predictions.jsonl  one line per question: benchmark, id, group, prompt hash, raw output, parsed answer, gold,
                       correct (loglik: each choice's log-probability and the length-normalised answer; sc: votes)
    summary.json       per benchmark: accuracy with its 95% Wilson interval, unparseable rate, per-group accuracy,
                       chance and the majority class of the questions evaluated
    manifest.json      model and revision, adapter hash, template hash, seeds, decoding, data file hashes, versions
    results.md         our accuracies beside Meditron-70B's published ones
    accuracy.png       the same as a bar chart, with chance, majority-class and paper lines
"""

import hashlib
import json
import platform
import textwrap
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from ..config.files import write_atomic
from ..data import chatml
from ..models.cache import package_versions as installed_versions

PACKAGES = ("meditron-finetune", "torch", "transformers", "peft", "accelerate", "trl", "datasets", "tokenizers",
            "hydra-core")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """One hash of every file in a folder (names and contents), e.g. an adapter."""
    listing = [f"{p.relative_to(folder).as_posix()} {file_sha256(p)}" for p in sorted(folder.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **installed_versions(PACKAGES)}


def write_json(path: Path, data) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=1, default=str) + "\n"))


def write_predictions(path: Path, records: list[dict]) -> None:
    write_atomic(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in records)))


def results_table(summary: dict, heading: str, paper_only: dict) -> str:
    """Markdown: one row per benchmark evaluated, then the paper's benchmarks we do not evaluate."""
    header = ("| Benchmark | Questions | Accuracy (95% CI) | Unparseable | Meditron-70B (paper) | Chance | "
              "Majority class |")
    lines = [f"# {heading}", "", header,
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary.values():
        low, high = s["ci95"]
        paper = f"{s['paper']:.1f}" if s["paper"] is not None else "–"
        lines.append(f"| {s['title']} ({s['split']}) | {s['n']} | {100 * s['accuracy']:.1f} "
                     f"({100 * low:.1f}–{100 * high:.1f}) | {100 * s['unparseable_rate']:.1f}% | {paper} | "
                     f"{reference_cells(s)} |")
    for entry in paper_only.values():
        lines.append(f"| {entry['title']} | – | not evaluated | – | {entry['paper']:.1f} | – | – |")
    lines += ["", "Paper: Meditron-70B fine-tuned per benchmark, self-consistency chain of thought (Chen et al. 2023, "
              "MEDITRON-70B: Scaling Medical Pretraining for Large Language Models). Accuracies in %; the interval is "
              "the 95% Wilson score interval."]
    return "\n".join(lines) + "\n"


def reference_rates(records: list[dict]) -> dict:
    """What guessing scores on these questions (the mean of 1 / number of choices), and what always giving their
    commonest gold answer scores (the majority class: a model answering "yes" to every PubMedQA question gets it)."""
    choices = [r.get("choices") or list(r.get("logprobs") or ()) for r in records]
    chance = sum(1 / len(c) for c in choices) / len(records) if records and all(choices) else None
    answer, count = Counter(r["gold"] for r in records).most_common(1)[0] if records else (None, 0)
    return {"chance": chance, "majority": {"answer": answer, "rate": count / len(records) if records else None}}


def reference_cells(summary: dict) -> str:
    """`chance | majority class` of one benchmark's summary, in %, for a Markdown row."""
    chance, majority = summary.get("chance"), summary.get("majority") or {}
    cells = [f"{100 * chance:.1f}" if chance is not None else "–",
             f"{100 * majority['rate']:.1f} ({majority['answer']})" if majority.get("rate") is not None else "–"]
    return " | ".join(cells)


def short_label(text: str, width: int = 40) -> str:
    """A long path kept readable in a legend: its start and end around an ellipsis."""
    return text if len(text) <= width else f"{text[: width // 2 - 1]}…{text[-(width // 2):]}"


def draw_accuracy(ax, summaries: dict[str, dict], base: str | None = None) -> None:
    """Grouped bars: accuracy per benchmark (x) for each labelled evaluation's summary.json, with its 95% interval;
    across each group, lines for chance, the majority class, the base model (`base`, a label) and the paper."""
    names = list(dict.fromkeys(name for summary in summaries.values() for name in summary))
    width = 0.8 / len(summaries)
    for j, (label, summary) in enumerate(summaries.items()):
        xs = [i + (j - (len(summaries) - 1) / 2) * width for i, name in enumerate(names) if name in summary]
        ours = [100 * summary[name]["accuracy"] for name in names if name in summary]
        lows = [100 * summary[name]["ci95"][0] for name in names if name in summary]
        highs = [100 * summary[name]["ci95"][1] for name in names if name in summary]
        errors = [[max(0.0, o - lo) for o, lo in zip(ours, lows)],  # max: rounding at 0 and 100 %
                  [max(0.0, hi - o) for o, hi in zip(ours, highs)]]
        ax.bar(xs, ours, width=width * 0.9, yerr=errors,
               capsize=3, label=short_label(label))
    lines = {"chance": ("tab:gray", "--"), "majority class": ("black", ":"), "base model": ("black", "-."),
             "Meditron-70B (paper)": ("darkred", "-")}
    drawn = set()
    for i, name in enumerate(names):
        first = next(summary[name] for summary in summaries.values() if name in summary)
        levels = {"chance": first.get("chance"), "majority class": (first.get("majority") or {}).get("rate"),
                  "base model": summaries[base][name]["accuracy"] if name in summaries.get(base, {}) else None,
                  "Meditron-70B (paper)": first["paper"] / 100 if first.get("paper") is not None else None}
        for what, level in levels.items():
            if level is not None:
                color, style = lines[what]
                ax.hlines(100 * level, i - 0.45, i + 0.45, colors=color, linestyles=style, linewidth=2, zorder=3,
                          label=None if what in drawn else what)
                drawn.add(what)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)


def wrapped_title(fig: Figure, title: str) -> str:
    """The title in lines that fit the figure's width (about 11 characters an inch at the default size)."""
    return textwrap.fill(title, width=max(30, int(fig.get_figwidth() * 11)))


def plot_accuracy(summary: dict, path: Path, title: str) -> None:
    """Our accuracy per benchmark with its 95% interval, beside chance, the majority class and the paper."""
    fig = Figure(figsize=(1.6 * len(summary) + 4.5, 4), dpi=100)
    ax = fig.subplots()
    draw_accuracy(ax, {"this evaluation (95% CI)": summary})
    ax.set_title(wrapped_title(fig, title), fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png"))


def build_manifest(prepared, model, batch_size: int, command: str) -> dict:
    """What the evaluation ran: model, adapter, template, seeds, decoding, data files, versions (prepared:
    finetune.evaluation.harness.Prepared)."""
    cfg, ev, adapter = prepared.cfg, prepared.cfg.eval, prepared.adapter
    decoding = {"mode": ev.mode, "batch_size": batch_size}
    if ev.mode != "loglik":
        decoding.update(max_new_tokens=ev.max_new_tokens, stop=chatml.IM_END)
        if ev.mode == "generate":
            decoding.update(greedy=True)
        else:
            decoding.update(samples=ev.sc.k, temperature=ev.sc.temperature, top_k=0, top_p=1.0,
                            vote="majority; tie: first sampled; unparseable never wins")
    return {
        "command": command,
        "model": {"name": cfg.model.name, "revision": cfg.model.revision, "source": str(prepared.source),
                  "files": str(prepared.model_dir),  # for a Hub model, the snapshot folder named by its commit
                  "dtype": str(next(model.parameters()).dtype), "device": str(next(model.parameters()).device)},
        "adapter": None if adapter is None else {
            "given": adapter.given, "path": str(adapter.path), "sha256": folder_sha256(adapter.path),
            "trained_on": adapter.trained_on,
            "run_model": OmegaConf.to_container(adapter.run_config.model) if adapter.run_config else None},
        "template_sha256": chatml.template_hash(),
        "system_prompt": cfg.data.system_prompt,
        "seeds": {"eval.seed": ev.seed,
                  "used_for": "the eval.limit sample" + (" and sampling" if ev.mode == "sc" else "")},
        "decoding": decoding,
        "data": {spec.name: {"loader": spec.loader, "split": spec.split, "source": split.source,
                             "evaluated": len(items), "of": len(split), "limit": ev.limit,
                             "files": {str(f): file_sha256(f) for f in split.files}}
                 for spec, split, items in prepared.benchmarks},
        "packages": package_versions(),
    }


def write_results(out_dir: Path, cfg: DictConfig, records: list[dict], summary: dict, manifest: dict, heading: str,
                  paper_only: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    config = f"# {manifest['command']}\n# resolved recipe of this evaluation\n" + OmegaConf.to_yaml(cfg)
    write_atomic(out_dir / "eval_config.yaml", lambda p: p.write_text(config))
    write_predictions(out_dir / "predictions.jsonl", records)
    write_json(out_dir / "manifest.json", manifest)
    write_atomic(out_dir / "results.md", lambda p: p.write_text(results_table(summary, heading, paper_only)))
    plot_accuracy(summary, out_dir / "accuracy.png", heading)
    write_json(out_dir / "summary.json", summary)  # last: its presence means the evaluation is complete
