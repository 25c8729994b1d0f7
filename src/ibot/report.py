"""``ibot report RUN_DIR``: one page (Markdown + HTML, PNG plots) from a run's metrics and evaluations.

Reads ``metrics.jsonl`` (training rows and k-NN monitor rows), ``config.yaml`` and the JSON
results the ``ibot eval`` commands leave in ``RUN_DIR/eval/``; writes ``report.md``,
``report.html`` and the plots under ``RUN_DIR/report/``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ibot.errors import DataError
from ibot.eval.results import format_lr
from ibot.run_folder import RunFolder
from ibot.tracking import Trackers, send_to_run
from ibot.train.metrics import read_metrics


def _plot(path: Path, panels: list[tuple[str, str, list[tuple[str, list[float], list[float]]]]]) -> None:
    """One row of panels: (title, x label, [(label, xs, ys), ...]) each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, xlabel, series) in zip(axes[0], panels):
        for label, xs, ys in series:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _series(rows: list[dict[str, Any]], x: str, keys: list[str]) -> list[tuple[str, list[float], list[float]]]:
    out = []
    for key in keys:
        points = [(r[x], r[key]) for r in rows if key in r and x in r]
        if points:
            out.append((key, [p[0] for p in points], [p[1] for p in points]))
    return out


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _lr_cell(row: dict[str, Any]) -> str:
    """A saved probe row's lr with its marks (results written before the marks have none)."""
    return format_lr(row["lr"], row.get("extended", 0), row.get("lr_edge"))


def _eval_tables(run: RunFolder) -> list[str]:
    """Markdown tables of whatever evaluations were saved, trained weights next to random init."""
    lines: list[str] = []
    loaded = {}
    for command in ("knn", "probe", "robustness", "finetune", "dense"):
        for random_init in (False, True):
            path = run.eval_result(command, random_init)
            if path.is_file():
                loaded[command, random_init] = json.loads(path.read_text())
    for random_init in (False, True):
        knn = loaded.get(("knn", random_init))
        if knn:
            if not lines:
                lines.append("## Frozen-feature evaluation\n")
            ks = list(knn["knn"])
            cells = [f"{knn['knn'][k]['top1']:.2f}" for k in ks]
            lines += _table(["k-NN top-1 (" + knn["weights"] + ")", *(f"k={k}" for k in ks)], [["", *cells]]) + [""]
    probe_rows = []
    for random_init in (False, True):
        probe = loaded.get(("probe", random_init))
        if probe:
            probe_rows += [
                [probe["weights"], r["probe"], _lr_cell(r), f"{r['test_top1']:.2f}"] for r in probe["probes"]
            ]
    if probe_rows:
        lines += ["### Probes (test top-1 %, lr picked on a validation split)\n"]
        lines += _table(["weights", "probe", "lr", "test top-1"], probe_rows) + [""]
    robust_rows = []
    for random_init in (False, True):
        robust = loaded.get(("robustness", random_init))
        if robust:
            robust_rows.append(
                [
                    robust["weights"],
                    robust["probe"],
                    f"{robust['clean_top1']:.2f}",
                    f"{robust['mean_corrupted_top1']:.2f}",
                ]
            )
    if robust_rows:
        lines += ["### Robustness: clean-trained probe on 15 corruptions x 5 severities (CIFAR-10-C style)\n"]
        lines += _table(["weights", "probe", "clean top-1", "mean corrupted top-1"], robust_rows) + [""]
    finetune_rows = [
        [r["weights"], f"{r['epochs']:g}", f"{r['test_top1']:.2f}"]
        for r in (loaded.get(("finetune", random_init)) for random_init in (False, True))
        if r
    ]
    if finetune_rows:
        lines += ["### Fine-tuning\n"] + _table(["weights", "epochs", "test top-1"], finetune_rows) + [""]
    dense_rows = []
    for random_init in (False, True):
        dense = loaded.get(("dense", random_init))
        if dense:
            dense_rows += [
                [dense["weights"], r["features"], f"{r['test_miou']:.2f}", f"{r['test_pixel_accuracy']:.2f}"]
                for r in dense["dense"]
            ]
    if dense_rows:
        lines += ["### Dense probe on mosaics (one class per tile)\n"]
        lines += _table(["weights", "features", "mIoU", "pixel accuracy"], dense_rows) + [""]
    return lines


def _saved_results(run: RunFolder, command: str) -> list[dict]:
    """The saved results of ``ibot eval <command>``: trained weights first, then random init."""
    paths = [run.eval_result(command, random_init) for random_init in (False, True)]
    return [json.loads(p.read_text()) for p in paths if p.is_file()]


def _retrieval_cluster_lowshot_tables(run: RunFolder) -> list[str]:
    """Tables of ``ibot eval retrieval`` (mAP@R, recall@k), ``ibot eval cluster`` (k-means scores) and
    ``ibot eval lowshot`` (mean ± std over draws)."""
    lines: list[str] = []
    retrieval_rows = [
        [r["weights"], r["index"], f"{r['map_at_r']:.2f}", f"{r['recall_at_1']:.2f}", f"{r['recall_at_5']:.2f}"]
        for r in _saved_results(run, "retrieval")
    ]
    if retrieval_rows:
        lines += ["### Retrieval: test images query the train images\n"]
        lines += _table(["weights", "index", "mAP@R", "recall@1", "recall@5"], retrieval_rows) + [""]
    cluster_rows = [
        [r["weights"], r["split"], str(r["clusters"]), f"{r['accuracy']:.2f}"]
        + [f"{r[m]:.3f}" for m in ("nmi", "ari", "fmi")]
        for r in _saved_results(run, "cluster")
    ]
    if cluster_rows:
        lines += ["### Unsupervised classification: k-means on [cls]\n"]
        lines += _table(["weights", "split", "k", "accuracy (Hungarian)", "NMI", "ARI", "FMI"], cluster_rows) + [""]
    lowshot_rows = [
        [r["weights"], s["setting"], str(s["labelled"])]
        + [f"{s[m]['mean']:.2f} ± {s[m]['std']:.2f}" for m in ("knn", "logreg")]
        for r in _saved_results(run, "lowshot")
        for s in r["lowshot"]
    ]
    if lowshot_rows:
        lines += ["### Low-shot: test top-1 %, mean ± std over draws of the labelled images\n"]
        head = ["weights", "labels", "labelled images", "k-NN top-1", "logistic regression top-1"]
        lines += _table(head, lowshot_rows) + [""]
    return lines


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir``; returns their paths."""
    run = RunFolder(Path(run_dir))
    if not run.metrics.is_file():
        raise DataError(f"{run.metrics}: no metrics to report (is {run.root} a pre-training run folder?)")
    with run.lock("report"):
        written = _write_report(run)
        send_to_run(run, lambda trackers: _log_report(trackers, run, written[1]))
        return written


def _log_report(trackers: Trackers, run: RunFolder, page: Path) -> None:
    """``report.html`` and its figures (so that its links hold) to the run's experiment trackers."""
    trackers.log_file(page)
    for figure in sorted(run.report_figures.glob("*.png")):
        trackers.log_file(figure, run.relative(run.report_figures))


def _write_report(run: RunFolder) -> tuple[Path, Path]:
    rows = read_metrics(run.metrics)
    train_rows = [r for r in rows if "loss" in r]
    monitor_rows = [r for r in rows if "knn_top1" in r]
    figures = run.report_figures
    figures.mkdir(exist_ok=True)
    images: list[tuple[str, str]] = []
    if train_rows:
        _plot(
            figures / "losses.png",
            [
                ("losses", "step", _series(train_rows, "step", ["loss", "loss_cls", "loss_patch"])),
                ("KoLeo", "step", _series(train_rows, "step", ["loss_koleo"])),
                ("throughput (images/s)", "step", _series(train_rows, "step", ["images_per_second"])),
                ("data-wait share", "step", _series(train_rows, "step", ["data_wait_share"])),
            ],
        )
        _plot(
            figures / "schedules.png",
            [
                (key.replace("_", " "), "step", _series(train_rows, "step", [key]))
                for key in ("lr", "weight_decay", "teacher_momentum", "teacher_temp")
            ],
        )
        images += [
            ("Training losses", run.relative(figures / "losses.png")),
            ("Schedules", run.relative(figures / "schedules.png")),
        ]
        if any("cls_teacher_entropy" in r for r in train_rows):
            _plot(
                figures / "collapse.png",
                [
                    (
                        "teacher entropy (nats)",
                        "step",
                        _series(train_rows, "step", ["cls_teacher_entropy", "patch_teacher_entropy"]),
                    ),
                    ("KL student || teacher", "step", _series(train_rows, "step", ["cls_kl", "patch_kl"])),
                    (
                        "batch perplexity of targets",
                        "step",
                        _series(train_rows, "step", ["cls_perplexity", "patch_perplexity"]),
                    ),
                ],
            )
            images.append(("Collapse monitors", run.relative(figures / "collapse.png")))
    if monitor_rows:
        _plot(
            figures / "knn.png",
            [
                (
                    "k-NN top-1 % (monitor subset)",
                    "training minutes",
                    _series(monitor_rows, "train_minutes", ["knn_top1"]),
                )
            ],
        )
        images.append(("k-NN during pre-training", run.relative(figures / "knn.png")))
    if run.attention_pool(False).is_file():
        images.append(("Attention-pooling weights over test images", run.relative(run.attention_pool(False))))

    md = [f"# iBOT run `{run.root.name}`\n"]
    if train_rows:
        last = train_rows[-1]
        summary = [
            ["steps", str(last["step"])],
            ["epochs", f"{last.get('epoch', float('nan')):.2f}"],
            ["training minutes", f"{last.get('train_minutes', float('nan')):.1f}"],
            ["last loss", f"{last['loss']:.4f}"],
            ["images/s (last window)", f"{last.get('images_per_second', float('nan')):.1f}"],
            ["data-wait share (last window)", f"{100 * last.get('data_wait_share', float('nan')):.0f} %"],
        ]
        if monitor_rows:
            summary.append(["k-NN monitor, last", f"{monitor_rows[-1]['knn_top1']:.2f} %"])
        md += _table(["", "value"], summary) + [""]
    md += _eval_tables(run)
    md += _retrieval_cluster_lowshot_tables(run)
    for title, path in images:
        md += [f"## {title}\n", f"![{title}]({path})\n"]
    run.report_md.write_text("\n".join(md) + "\n")
    run.report_html.write_text(_markdown_to_html(md, run.root.name))
    return run.report_md, run.report_html


def _markdown_to_html(lines: list[str], title: str) -> str:
    """The small Markdown subset this report writes (headings, tables, images) as HTML."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if table:
            head, *rest = table
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>")
            body.extend("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest)
            body.append("</table>")
            table.clear()

    for raw in "\n".join(lines).splitlines():
        line = raw.strip()
        if line.startswith("|"):
            cells = [html.escape(c.strip().strip("`")) for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip().replace('`', ''))}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}" style="max-width:100%">')
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
    )
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"
