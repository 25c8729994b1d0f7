"""``ibot embed``: one embedding per readable image of a folder, written to Parquet or .npy in chunks.

Outputs (one row per readable image, in the folder's sorted order):

* ``FILE.parquet`` (needs the ``embed`` extra, pyarrow): columns ``path`` (string, relative to
  the folder), ``label`` (string: the class folder's name; null without class folders),
  ``label_index`` (int32; -1 without class folders) and ``embedding`` (fixed-size list of D
  float32). Each chunk of rows is one row group.
* ``FILE.npy``: an (N, D) float32 array, with ``FILE.npy.paths.tsv`` beside it: a header
  ``path<TAB>label<TAB>label_index`` and one line per row of the array, in the same order (an
  empty label without class folders; tabs and newlines in names written as ``\\t`` / ``\\n``).
  The array is preallocated for every file of the folder through ``np.lib.format.open_memmap``
  and shrunk in place at the end when some were skipped.
* ``FILE.npy`` with pool "patch": an (N, h, w, D) float16 array of the last block's patch tokens
  (after the final norm; h, w: the patch grid at the evaluation size), the same sidecar. Each
  batch is written into the memory map as soon as it is encoded. Parquet is refused: a patch
  grid belongs in an array file.

Memory stays bounded by one chunk of rows (plus the memory map's reclaimable page cache),
whatever the folder's size. Every file is written under a temporary name in its folder and
renamed at the end, so a failure or Ctrl-C leaves no half-written output. Skipped files are
summarised in one line and listed in ``FILE.skipped.tsv`` (the full name: ``emb.parquet`` ->
``emb.parquet.skipped.tsv``, so ``emb.npy`` and ``emb.parquet`` keep their own lists). Without
``force`` nothing is written while any of these files exists.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ibot.data.collate import skips_of
from ibot.data.datasets import Sample
from ibot.data.skips import Skip, SkipLog, report_skips
from ibot.errors import IBOTError
from ibot.eval.features import Frozen, build_eval_dataset, dataset_skips, encode, load_frozen
from ibot.extras import require
from ibot.storage import TMP_SUFFIX, fsync_folder, fsync_path

logger = logging.getLogger(__name__)

POOLS = ("cls", "mean", "patch")
FORMATS = {".parquet": "parquet", ".npy": "npy"}
SIDECAR_HEADER = "path\tlabel\tlabel_index"


@dataclass(frozen=True)
class EmbedRequest:
    """What ``ibot embed`` embeds: ``weights`` (a run folder, its teacher file or a foreign ViT; with
    ``random_init`` the same architecture untrained) over the images under ``images``, written to
    ``out`` (.parquet or .npy). ``pool``: "cls" ([cls] of the last block after the final norm),
    "mean" (the mean of its patch tokens) or "patch" (the tokens themselves, .npy only);
    ``batch_size`` 0 takes ``eval.batch_size``; ``chunk_rows`` rows are buffered before each
    write (with "patch" at most one batch: a grid of tokens per image is large)."""

    weights: str
    images: str
    out: str
    pool: str = "cls"
    batch_size: int = 0
    force: bool = False
    random_init: bool = False
    overrides: tuple[str, ...] = ()
    num_workers: int = 2
    chunk_rows: int = 4096
    progress: bool = True


def embed_images(frozen: Frozen, images: torch.Tensor, pool: str = "cls", batch_size: int = 0) -> torch.Tensor:
    """(X, C, S, S) images -> (X, D) fp32: [cls] of the last block, or the mean of its patch tokens;
    with ``pool`` "patch" (X, h, w, D) fp16: the patch tokens on their (square) grid."""
    if pool == "patch":
        encoded = encode(frozen.backbone, images, frozen.runtime, patch_dtype=torch.float16, batch_size=batch_size)
        tokens = encoded.patches
        side = math.isqrt(tokens.shape[1])  # type: ignore[union-attr]
        return tokens.reshape(len(tokens), side, side, -1)  # type: ignore[union-attr]
    if pool == "mean":
        encoded = encode(frozen.backbone, images, frozen.runtime, patch_dtype=torch.float32, batch_size=batch_size)
        return encoded.patches.mean(dim=1)  # type: ignore[union-attr]
    return encode(frozen.backbone, images, frozen.runtime, batch_size=batch_size).cls[:, -1]


@dataclass
class Rows:
    """A buffered chunk: relative paths, label names (None: no class), label indices, embeddings
    (fp32 vectors, or fp16 patch grids)."""

    paths: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    label_indices: list[int] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def matrix(self) -> np.ndarray:
        return np.concatenate(self.embeddings)  # in the pool's dtype: fp16 grids stay fp16

    def split(self, n: int) -> tuple[Rows, Rows]:
        """The first ``n`` rows and the rest."""
        matrix = self.matrix()
        head = Rows(self.paths[:n], self.labels[:n], self.label_indices[:n], [matrix[:n]])
        return head, Rows(self.paths[n:], self.labels[n:], self.label_indices[n:], [matrix[n:]])


def output_format(out: Path) -> str:
    """ "parquet" or "npy" from the suffix of ``out``; one line for any other."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise IBOTError(f"{out}: the output must end in .parquet or .npy")
    return fmt


def sidecar_path(out: Path) -> Path:
    """``emb.npy`` -> ``emb.npy.paths.tsv``: the paths and labels of the rows of an .npy output."""
    return out.with_name(f"{out.name}.paths.tsv")


def skipped_path(out: Path) -> Path:
    """``emb.parquet`` -> ``emb.parquet.skipped.tsv``: the files ``ibot embed`` left out, and why."""
    return out.with_name(f"{out.name}.skipped.tsv")


def _check_request(request: EmbedRequest) -> tuple[Path, str]:
    out = Path(request.out)
    fmt = output_format(out)
    if request.pool not in POOLS:
        raise IBOTError(f"--pool: unknown {request.pool!r}; choose from {', '.join(POOLS)}")
    if request.pool == "patch" and fmt != "npy":
        raise IBOTError(f"{out}: --pool patch writes an (images, h, w, D) array; name a .npy output")
    if request.chunk_rows < 1 or request.batch_size < 0:
        raise IBOTError("embed: chunk rows must be >= 1 and --batch-size >= 0")
    if fmt == "parquet":
        require("pyarrow.parquet", "embed", "ibot embed to .parquet")  # before minutes of encoding
    if out.is_dir():
        raise IBOTError(f"{out}: is a folder; --out names the file to write")
    existing = [str(p) for p in (*_outputs(out, fmt), skipped_path(out)) if p.exists()]
    if existing and not request.force:  # every file embed may write: it overwrites none of them unasked
        also = f" and {', '.join(existing[1:])}" if len(existing) > 1 else ""
        raise IBOTError(f"{existing[0]}: already exists; pass --force to overwrite it{also}")
    return out, fmt


def run_embed(request: EmbedRequest) -> dict:
    """Embed every readable image under ``request.images`` into ``request.out``; a JSON-able summary."""
    out, fmt = _check_request(request)
    start = time.monotonic()
    frozen = load_frozen(request.weights, request.overrides, request.random_init)
    dataset = build_eval_dataset(request.images, frozen.cfg)
    skips = dataset_skips(dataset)
    dim = frozen.backbone.embed_dim
    item = _item_shape(frozen, request.pool)
    try:
        with _staged(_outputs(out, fmt)) as tmps:
            if fmt == "parquet":
                sink = _ParquetSink(tmps[0], dim)
            else:
                sink = _NpySink(tmps[0], tmps[1], len(dataset), item, _dtype(request.pool))
            with contextlib.closing(sink):
                rows = _write_rows(frozen, dataset, request, sink, skips)
            if rows == 0:
                raise IBOTError(f"{request.images}: no readable images to embed; {skips.summary('embed')}")
    finally:  # also when nothing was readable: the list says why
        report_skips(skips, "embed", skipped_path(out))
    seconds = time.monotonic() - start
    return {
        "weights": "random-init" if request.random_init else request.weights,
        "images": rows,
        "dim": dim,
        "pool": request.pool,
        "out": str(out),
        "seconds": round(seconds, 1),
        **skips.as_counts(),
        **({"grid": list(item[:2])} if request.pool == "patch" else {}),
    }


def _item_shape(frozen: Frozen, pool: str) -> tuple[int, ...]:
    """One image's row: (D,), or (h, w, D) for "patch" (the grid of the square evaluation view)."""
    dim = frozen.backbone.embed_dim
    if pool != "patch":
        return (dim,)
    side = frozen.cfg.eval_image_size // frozen.backbone.patch_size  # the config checks it divides
    return (side, side, dim)


def _dtype(pool: str) -> np.dtype:
    """fp16 halves a patch array (as the feature cache stores patches); vectors stay fp32."""
    return np.dtype(np.float16 if pool == "patch" else np.float32)


def format_embed(result: dict) -> str:
    grid = f"{result['grid'][0]}x{result['grid'][1]} patches, " if "grid" in result else ""
    return (
        f"wrote {result['images']} embeddings ({grid}dim {result['dim']}, pool {result['pool']}) "
        f"to {result['out']} in {result['seconds']:.1f} s; skipped {result['skipped_images']} files"
    )


def _outputs(out: Path, fmt: str) -> list[Path]:
    """The files an output consists of, the main file first: ``_staged`` renames it last, so it
    appears only when the others are in place."""
    return [out] if fmt == "parquet" else [out, sidecar_path(out)]


@contextlib.contextmanager
def _staged(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary names in the same folders; renamed over ``paths`` (the first last) on success,
    removed on any exception, Ctrl-C included."""
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(p)
    tmps = [p.with_name(f".{p.name}.{os.getpid()}{TMP_SUFFIX}") for p in paths]
    try:
        yield tmps
        for tmp, path in reversed(list(zip(tmps, paths))):
            fsync_path(tmp)  # the data on disk before the name: a crash cannot leave a renamed, empty file
            os.replace(tmp, path)
        fsync_folder(paths[0].parent)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _remove_stale(path: Path) -> None:
    """Delete the temporary files of ``path`` whose writer is gone (killed: no ``finally`` ran)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        pid = tmp.name[len(path.name) + 2 : -len(TMP_SUFFIX)]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _collate_rows(items: list[Sample | Skip]) -> tuple[torch.Tensor, list[int], tuple[Skip, ...]]:
    """(images, their dataset indices, the skipped files) of one batch."""
    samples = [s for s in items if isinstance(s, Sample)]
    images = torch.stack([s.view for s in samples]) if samples else torch.empty(0)
    return images, [s.index for s in samples], skips_of(items)


def _write_rows(frozen: Frozen, dataset: Dataset, request: EmbedRequest, sink, skips: SkipLog) -> int:  # type: ignore[no-untyped-def]
    """Encode ``dataset`` batch by batch, hand ``sink`` a chunk every ``chunk_rows`` rows; the rows written."""
    batch_size = request.batch_size or frozen.cfg.eval.batch_size
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=request.num_workers, collate_fn=_collate_rows)
    naming = RowNames(dataset, request.images)
    written, rows = 0, Rows()
    with tqdm(total=len(dataset), desc=f"embed {request.images}", unit="img", disable=not request.progress) as bar:
        for images, indices, batch_skips in loader:
            skips.extend(batch_skips)  # decoded in the loader workers: their copies of the log are lost
            bar.update(len(indices) + len(batch_skips))
            if not indices:
                continue
            naming.add(rows, indices)
            rows.embeddings.append(embed_images(frozen, images, request.pool).numpy())
            if request.pool == "patch":  # a batch of grids is written at once: one batch in memory
                written += sink.write(rows)
                rows = Rows()
            while len(rows) >= request.chunk_rows:  # chunks of exactly chunk_rows rows: one row group each
                chunk, rows = rows.split(request.chunk_rows)
                written += sink.write(chunk)
    if len(rows):
        written += sink.write(rows)
    return written


class RowNames:
    """Relative path and label of a dataset index: an image folder's files, or tar shard members."""

    def __init__(self, dataset: Dataset, folder: str) -> None:
        index = getattr(dataset, "index", None)
        self.root = str(index.root) if index is not None else folder
        self.in_folder = index is not None  # image folder paths start with the root; shard members do not
        self.paths = index.paths if index is not None else [e.name for e in dataset.entries]  # type: ignore[attr-defined]
        self.classes = getattr(dataset, "classes", ())
        self.label_of = dataset.labels  # type: ignore[attr-defined]

    def relative(self, i: int) -> str:
        path = self.paths[i]
        return os.path.relpath(path, self.root) if self.in_folder else path

    def label(self, i: int) -> str | None:
        """The class folder's name (a shard's label index as text); None without a class."""
        label = self.label_of[i]
        return None if label < 0 else (self.classes[label] if self.classes else str(label))

    def add(self, rows: Rows, indices: list[int]) -> None:
        for i in indices:
            rows.paths.append(self.relative(i))
            rows.labels.append(self.label(i))
            rows.label_indices.append(self.label_of[i])


class _ParquetSink:
    """Row groups of (path, label, label_index, embedding) appended to a Parquet file."""

    def __init__(self, path: Path, dim: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.schema = pa.schema(
            [
                ("path", pa.string()),
                ("label", pa.string()),
                ("label_index", pa.int32()),
                ("embedding", pa.list_(pa.float32(), dim)),
            ]
        )
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, rows: Rows) -> int:
        pa = self.pa
        matrix = rows.matrix()
        flat = pa.array(matrix.reshape(-1), type=pa.float32())
        table = pa.Table.from_arrays(
            [
                pa.array(rows.paths, type=pa.string()),
                pa.array(rows.labels, type=pa.string()),
                pa.array(rows.label_indices, type=pa.int32()),
                pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1]),
            ],
            schema=self.schema,
        )
        self.writer.write_table(table, row_group_size=len(rows))  # one row group per chunk
        return len(rows)

    def close(self) -> None:
        self.writer.close()


class _NpySink:
    """Rows into a preallocated (capacity, *item) .npy ((D,) float32, or (h, w, D) float16 patch
    grids) and their names into the sidecar TSV."""

    def __init__(
        self, path: Path, sidecar: Path, capacity: int, item: tuple[int, ...], dtype: np.dtype = np.dtype(np.float32)
    ) -> None:
        self.path, self.item, self.dtype, self.rows = path, item, dtype, 0
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(capacity, *item))
        self.sidecar = open(sidecar, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.sidecar.write(SIDECAR_HEADER + "\n")

    def write(self, rows: Rows) -> int:
        matrix = rows.matrix()
        if matrix.shape[1:] != self.item:  # e.g. an eval.image_size the patch size does not divide
            raise IBOTError(f"embed: rows of shape {matrix.shape[1:]} do not fit the output's {self.item}")
        self.array[self.rows : self.rows + len(rows)] = matrix
        self.array.flush()  # written back: the pages may be dropped, memory stays bounded
        for path, label, index in zip(rows.paths, rows.labels, rows.label_indices):
            self.sidecar.write(f"{_escape(path)}\t{_escape(label or '')}\t{index}\n")
        self.rows += len(rows)
        return len(rows)

    def close(self) -> None:
        capacity = self.array.shape[0]
        del self.array  # unmap before the file is rewritten
        self.sidecar.close()
        if self.rows < capacity:
            shrink_npy(self.path, self.rows, self.item, self.dtype)


def shrink_npy(path: Path, rows: int, dim: int | tuple[int, ...], dtype: np.dtype = np.dtype(np.float32)) -> None:
    """Rewrite the header of a (capacity, *dim) .npy to (rows, *dim) and cut the file there.

    numpy pads the header so the first dimension can grow to 21 digits: the new header has the
    old one's length, and the data does not move.
    """
    with open(path, "r+b") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
        f.seek(0)
        item = (dim,) if isinstance(dim, int) else tuple(dim)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (rows, *item)})
        if f.tell() != offset:
            raise IBOTError(f"{path}: the .npy header changed length while shrinking it")
        f.truncate(offset + rows * math.prod(item) * np.dtype(dtype).itemsize)


def _escape(text: str) -> str:
    """A file name may hold a tab or a newline; the TSV must not break on it."""
    return text.replace("\t", "\\t").replace("\n", "\\n")


def read_sidecar(path: str | Path) -> list[tuple[str, str | None, int]]:
    """(path, label or None, label index) per row of an .npy output, from its ``.paths.tsv``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    rows = []
    for line in lines:
        name, label, index = line.rsplit("\t", 2)
        rows.append((name, label or None, int(index)))
    return rows
