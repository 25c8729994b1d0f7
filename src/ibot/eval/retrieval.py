"""Image retrieval on frozen [cls] features with faiss (the ``retrieval`` extra, faiss-cpu).

Features are L2-normalised, so inner product is cosine similarity. A database of up to
``IndexSettings.flat_max`` vectors is searched exactly (``IndexFlatIP``); a larger one through
an inverted file (``IndexIVFFlat``, ``nlist`` ~ 4 sqrt(N) cells, ``nprobe`` of them visited per
query), which trades a little recall for a search that does not touch every vector.

``retrieval_metrics`` scores a labelled query set against a labelled database as in Musgrave et
al. 2020, "A metric learning reality check": mAP@R, where R is the number of database images of
the query's class, and recall@k, the fraction of queries with at least one image of their class
among the top k.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ibot.errors import IBOTError
from ibot.extras import require


@dataclass(frozen=True)
class IndexSettings:
    """Exact search up to ``flat_max`` database vectors, IVF above (``nprobe`` cells per query)."""

    flat_max: int = 100_000
    nprobe: int = 32


def index_settings(cfg: Any) -> IndexSettings:
    """The ``eval.retrieval_*`` settings of a ``Config``."""
    return IndexSettings(cfg.eval.retrieval_flat_max, cfg.eval.retrieval_nprobe)


def faiss_module() -> Any:
    # faiss logs at INFO which of its builds it tried to load: not news to a user.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return require("faiss", "retrieval", "retrieval")


def normalize(features: Any) -> np.ndarray:
    """(N, D) tensor or array -> C-contiguous float32 rows of unit L2 norm (faiss' input)."""
    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


def ivf_nlist(size: int) -> int:
    """Cells of the inverted file for ``size`` vectors: about 4 sqrt(N), at most N."""
    return max(1, min(size, round(4 * math.sqrt(size))))


def build_index(database: np.ndarray, settings: IndexSettings = IndexSettings()) -> Any:
    """An inner-product faiss index over the (N, D) unit rows of ``database``."""
    faiss = faiss_module()
    size, dim = database.shape
    if size <= settings.flat_max:
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, ivf_nlist(size), faiss.METRIC_INNER_PRODUCT)
        index.train(database)
        index.nprobe = settings.nprobe
    index.add(database)
    return index


def describe_index(index: Any) -> str:
    """``flat (exact)`` or ``ivf (nlist 894, nprobe 32)``, for tables and result files."""
    nlist = getattr(index, "nlist", None)
    return "flat (exact)" if nlist is None else f"ivf (nlist {nlist}, nprobe {index.nprobe})"


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, min(k, N)), best first; an id is -1 where an IVF search found fewer."""
    return index.search(queries, min(k, index.ntotal))


@dataclass(frozen=True)
class RetrievalScores:
    """mAP@R and recall@k in percent over the queries whose class is in the database."""

    map_at_r: float
    recall: dict[int, float]
    queries: int
    queries_without_match: int  # their class has no database image: R = 0, left out

    def as_dict(self) -> dict:
        return {
            "map_at_r": self.map_at_r,
            **{f"recall_at_{k}": v for k, v in self.recall.items()},
            "queries": self.queries,
            "queries_without_match": self.queries_without_match,
        }


def average_precision_at_r(hits: np.ndarray, r: np.ndarray) -> np.ndarray:
    """AP@R per query: ``hits`` (Q, K >= max R) bool, best first; ``r`` (Q,) >= 1.

    AP@R = (1/R) sum_{i<=R} P(i) rel(i): precision at each rank within the first R that holds
    an image of the query's class, averaged over R (not over the hits found).
    """
    ranks = np.arange(1, hits.shape[1] + 1)
    within = ranks[None, :] <= r[:, None]
    precision = np.cumsum(hits, axis=1) / ranks[None, :]
    return (precision * (hits & within)).sum(axis=1) / r


def retrieval_metrics(
    database: np.ndarray,
    database_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    settings: IndexSettings = IndexSettings(),
    ks: tuple[int, ...] = (1, 5),
    chunk: int = 256,
) -> tuple[RetrievalScores, str]:
    """Scores of ``queries`` (unit rows) against ``database`` (unit rows), and the index used."""
    index = build_index(database, settings)
    database_labels = np.asarray(database_labels)
    query_labels = np.asarray(query_labels)
    classes, counts = np.unique(database_labels, return_counts=True)
    per_class = dict(zip(classes.tolist(), counts.tolist()))
    r = np.array([per_class.get(int(c), 0) for c in query_labels])
    keep = np.flatnonzero(r > 0)
    if keep.size == 0:
        raise IBOTError("retrieval: no query's class has an image in the database")
    ap, found = [], {k: [] for k in ks}
    for start in range(0, keep.size, chunk):
        rows = keep[start : start + chunk]
        k = max(int(r[rows].max()), *ks)
        _, ids = search(index, queries[rows], k)
        ranked = np.where(ids >= 0, database_labels[np.maximum(ids, 0)], -1)
        hits = np.zeros((rows.size, k), dtype=bool)
        hits[:, : ranked.shape[1]] = ranked == query_labels[rows][:, None]
        ap.append(average_precision_at_r(hits, r[rows]))
        for top in ks:
            found[top].append(hits[:, :top].any(axis=1))
    scores = RetrievalScores(
        map_at_r=100.0 * float(np.concatenate(ap).mean()),
        recall={top: 100.0 * float(np.concatenate(v).mean()) for top, v in found.items()},
        queries=int(keep.size),
        queries_without_match=int(len(query_labels) - keep.size),
    )
    return scores, describe_index(index)
