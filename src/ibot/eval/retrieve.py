"""``ibot retrieve``: the top-k images of an index folder for some query images, and a contact sheet.

The index folder's [cls] features go through ``extract_features``' cache (RUN/features by
default), so a second query over the same folder and weights encodes the queries alone. The
contact sheet is one self-contained HTML file: every picture is a small JPEG thumbnail embedded
as base64, so the page can be moved or mailed without the image folders.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ibot.data.datasets import Sample
from ibot.data.display import to_image
from ibot.data.reading import RGB8, Reading, decode_image
from ibot.data.skips import Skip, SkipLog, report_skips
from ibot.data.transforms import build_eval_transform
from ibot.errors import DataError, IBOTError
from ibot.eval.embed import RowNames, embed_images
from ibot.eval.features import Frozen, build_eval_dataset, extract_features, load_frozen
from ibot.eval.retrieval import build_index, describe_index, index_settings, normalize, search
from ibot.run_folder import RunFolder

THUMBNAIL = 96  # longest side of a contact-sheet picture, in pixels
SHEET_NAME = "retrieval.html"
RESULT_NAME = "retrieval.json"


@dataclass(frozen=True)
class RetrieveRequest:
    """``queries`` (image files or folders) searched in the images under ``index_dir``, encoded by
    ``weights``; results (JSON, HTML, skipped files) go to ``out_dir`` (default RUN/retrieval)."""

    weights: str
    index_dir: str
    queries: tuple[str, ...]
    k: int = 5
    out_dir: str = ""
    overrides: tuple[str, ...] = ()
    cache_dir: str = ""
    progress: bool = True


@dataclass(frozen=True)
class Gallery:
    """The index folder: (N, D) unit [cls] rows, and each row's file (absolute and relative)."""

    features: np.ndarray
    paths: list[str]
    names: list[str]


def run_retrieve(request: RetrieveRequest) -> dict:
    """Top-k of every query: {"index": ..., "queries": [{"query", "results": [{"path", "score"}]}]}.

    Holds the run folder's lock when the results or the feature cache go into it (the defaults)."""
    if request.k < 1:
        raise IBOTError("--k must be >= 1")
    run = RunFolder.of(request.weights)
    out_dir = Path(request.out_dir or run.retrieval)
    cache_dir = Path(request.cache_dir or run.features)
    writes_run = run.contains(out_dir) or run.contains(cache_dir)
    with run.lock("ibot retrieve") if writes_run else contextlib.nullcontext():
        return _retrieve(request, out_dir, cache_dir)


def _retrieve(request: RetrieveRequest, out_dir: Path, cache_dir: Path) -> dict:
    frozen = load_frozen(request.weights, request.overrides)
    skips = SkipLog()
    try:
        gallery = index_gallery(frozen, request, str(cache_dir), skips)
        names, images = load_queries(request.queries, frozen, skips)
    finally:
        report_skips(skips, "retrieve", out_dir / "skipped.tsv")
    query_features = normalize(embed_images(frozen, images, batch_size=frozen.cfg.eval.batch_size))
    index = build_index(gallery.features, index_settings(frozen.cfg))
    scores, ids = search(index, query_features, request.k)
    result = {
        "weights": request.weights,
        "index_dir": request.index_dir,
        "index_images": len(gallery.paths),
        "index": describe_index(index),
        "k": request.k,
        "queries": [
            {
                "query": name,
                "results": [
                    {"path": gallery.names[i], "score": round(float(s), 4)} for s, i in zip(row_s, row_i) if i >= 0
                ],
            }
            for name, row_s, row_i in zip(names, scores, ids)
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_NAME).write_text(json.dumps(result, indent=2))
    sheet = write_contact_sheet(out_dir / SHEET_NAME, result, gallery, ids, Reading.from_config(frozen.cfg.data))
    return {**result, "sheet": str(sheet), "json": str(out_dir / RESULT_NAME)}


def index_gallery(frozen: Frozen, request: RetrieveRequest, cache_dir: str, skips: SkipLog) -> Gallery:
    """[cls] of every readable image under the index folder (cached), and the file of each row."""
    feats = extract_features(
        frozen.backbone, request.index_dir, frozen.cfg, frozen.runtime, progress=request.progress, cache_dir=cache_dir
    )
    skips.extend(feats.skips)
    rows = RowNames(build_eval_dataset(request.index_dir, frozen.cfg), request.index_dir)
    left_out = {s.path for s in feats.skips}
    kept = [i for i, path in enumerate(rows.paths) if path not in left_out]
    if len(kept) != len(feats.labels):
        raise DataError(f"{request.index_dir}: the folder changed while it was indexed; run again")
    return Gallery(normalize(feats.last_cls), [rows.paths[i] for i in kept], [rows.relative(i) for i in kept])


def load_queries(paths: tuple[str, ...], frozen: Frozen, skips: SkipLog) -> tuple[list[str], torch.Tensor]:
    """Each query path is an image file or a folder of them: (names, (Q, C, S, S) eval views)."""
    cfg = frozen.cfg
    transform = build_eval_transform(cfg.eval_image_size, cfg.eval.crop_ratio, cfg.data.mean, cfg.data.std)
    names, views = [], []
    for path in paths:
        if os.path.isdir(path):
            dataset = build_eval_dataset(path, cfg)
            rows = RowNames(dataset, path)
            for i in range(len(dataset)):
                sample = dataset[i]
                if isinstance(sample, Sample):
                    names.append(rows.paths[i])
                    views.append(sample.view)
            skips.extend(dataset.skips)  # type: ignore[attr-defined]
        elif os.path.isfile(path):
            image = decode_image(path, path, Reading.from_config(cfg.data), cfg.data.max_image_pixels)
            if isinstance(image, Skip):
                skips.add(image)
                continue
            names.append(path)
            views.append(transform(image))
        else:
            raise DataError(f"{path}: query path does not exist")
    if not views:
        raise IBOTError(f"no readable query image among {', '.join(paths)}")
    return names, torch.stack(views)


def format_retrieve(result: dict) -> str:
    """Per query: its top-k paths with their scores."""
    lines = [f"index: {result['index_images']} images of {result['index_dir']}, {result['index']}"]
    for q in result["queries"]:
        lines.append(f"{q['query']}:")
        lines += [f"  {rank}. {r['score']:.4f}  {r['path']}" for rank, r in enumerate(q["results"], 1)]
    lines.append(f"contact sheet: {result['sheet']}")
    return "\n".join(lines)


def thumbnail_uri(path: str, reading: Reading, side: int = THUMBNAIL) -> str:
    """A ``data:`` URI of a JPEG thumbnail of ``path`` read as the run reads it (other than 3
    channels: the first three, or the first in grey; ``ibot.data.display``), longest side ``side``;
    "" if unreadable."""
    try:
        decoded = decode_image(path, path, reading)
        if isinstance(decoded, Skip):
            return ""
        image = to_image(decoded)
    except Exception:  # noqa: BLE001 - a picture that cannot be drawn leaves an empty cell
        return ""
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _cell(path: str, caption: str, reading: Reading) -> str:
    uri = thumbnail_uri(path, reading)
    picture = f'<img src="{uri}" alt="{html.escape(caption)}">' if uri else "<i>unreadable</i>"
    return f"<td>{picture}<br><small>{html.escape(caption)}</small></td>"


def write_contact_sheet(path: Path, result: dict, gallery: Gallery, ids: np.ndarray, reading: Reading = RGB8) -> Path:
    """One table row per query: the query, then its top-k thumbnails with rank, score and path
    (files read as ``reading`` says: the run's)."""
    rows = []
    for q, row_ids in zip(result["queries"], ids):
        cells = [_cell(q["query"], f"query: {os.path.basename(q['query'])}", reading)]
        for rank, (r, i) in enumerate(zip(q["results"], row_ids), 1):
            cells.append(_cell(gallery.paths[i], f"{rank}. {r['score']:.3f} {r['path']}", reading))
        rows.append('<tr class="query">' + "".join(cells) + "</tr>")
    title = html.escape(f"ibot retrieve: top-{result['k']} of {result['index_images']} images ({result['index']})")
    page = (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title}</title>"
        "<style>body{font-family:sans-serif} td{vertical-align:top;text-align:center;padding:4px;max-width:140px;"
        "word-break:break-all} tr.query td:first-child{border-right:3px solid #36c}</style></head><body>"
        f"<h1>{title}</h1><p>weights: {html.escape(result['weights'])}</p><table>"
        + "\n".join(rows)
        + "</table></body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
