"""What an evaluation leaves in its output directory, each file written whole or not at all (temp path + rename):

    eval_config.yaml   the resolved recipe (not config.yaml: output_dir may be the training run's own folder)
    predictions.jsonl  one line per question: benchmark, id, group, prompt hash, raw output, parsed answer, gold,
                       correct (loglik: each choice's log-probability and the length-normalised answer; sc: votes)
    summary.json       per benchmark: accuracy with its 95% Wilson interval, unparseable rate, per-group accuracy
    manifest.json      model and revision, adapter hash, template hash, seeds, decoding, data file hashes, versions
    results.md         our accuracies beside Meditron-70B's published ones
    accuracy.png       the same as a bar chart
"""

import hashlib
import json
import platform
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
    lines = [f"# {heading}", "",
             "| Benchmark | Questions | Accuracy (95% CI) | Unparseable | Meditron-70B (paper) |",
             "|---|---:|---:|---:|---:|"]
    for s in summary.values():
        low, high = s["ci95"]
        paper = f"{s['paper']:.1f}" if s["paper"] is not None else "–"
        lines.append(f"| {s['title']} ({s['split']}) | {s['n']} | {100 * s['accuracy']:.1f} "
                     f"({100 * low:.1f}–{100 * high:.1f}) | {100 * s['unparseable_rate']:.1f}% | {paper} |")
    for entry in paper_only.values():
        lines.append(f"| {entry['title']} | – | not evaluated | – | {entry['paper']:.1f} |")
    lines += ["", "Paper: Meditron-70B fine-tuned per benchmark, self-consistency chain of thought (Chen et al. 2023, "
              "MEDITRON-70B: Scaling Medical Pretraining for Large Language Models). Accuracies in %; the interval is "
              "the 95% Wilson score interval."]
    return "\n".join(lines) + "\n"


def plot_accuracy(summary: dict, path: Path, title: str) -> None:
    """Our accuracy per benchmark with its 95% interval, the paper's as a marker."""
    names = list(summary)
    ours = [100 * summary[n]["accuracy"] for n in names]
    errors = [[o - 100 * summary[n]["ci95"][0] for n, o in zip(names, ours)],
              [100 * summary[n]["ci95"][1] - o for n, o in zip(names, ours)]]
    fig = Figure(figsize=(1.6 * len(names) + 2.5, 4), dpi=100)
    ax = fig.subplots()
    ax.bar(names, ours, yerr=errors, capsize=4, color="tab:blue", label="this evaluation (95% CI)")
    papers = [(i, summary[n]["paper"]) for i, n in enumerate(names) if summary[n]["paper"] is not None]
    if papers:
        ax.scatter([i for i, _ in papers], [p for _, p in papers], marker="_", s=900, linewidths=3,
                   color="tab:red", zorder=3, label="Meditron-70B (paper)")
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
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
