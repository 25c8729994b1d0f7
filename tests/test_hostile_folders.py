"""Hostile image folders: symbolic-link loops, dangling links, odd directories and unusable files.

The folder is built in ``tmp_path`` (nothing shipped). Every count is exact: a scan that
follows a loop, or a reason that changes, fails here.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibot.config import load_config
from ibot.data.datasets import ImageFolder, ImageFolderIndex
from ibot.data.decode import DEFAULT_MAX_PIXELS, decode_rgb
from ibot.data.scan import scan_folder
from ibot.data.shards import TarShards
from ibot.data.skips import (
    DANGLING_LINK,
    EMPTY,
    IMAGE_NAMED_DIR,
    NOT_AN_IMAGE,
    TOO_MANY_PIXELS,
    UNREADABLE,
    VISITED,
    Skip,
    SkipLog,
    read_tsv,
)

from conftest import tiny_overrides

PIXEL_LIMIT = 1000  # data.max_image_pixels in these tests: 16 x 16 passes, 64 x 64 does not

SCAN_SKIPS = {
    "class_a/loop": VISITED,  # -> .. (the root)
    "class_a/alias_b": VISITED,  # -> ../class_b, walked at its real place
    "class_b/sub/up": VISITED,  # -> ../../.. (above the root)
    "class_b/dangling.jpg": DANGLING_LINK,
    "class_b/x.jpg": IMAGE_NAMED_DIR,
}
DECODE_SKIPS = {
    "class_a/empty.jpg": EMPTY,
    "class_a/truncated.jpg": UNREADABLE,
    "class_a/text.jpg": NOT_AN_IMAGE,
    "class_b/big.png": TOO_MANY_PIXELS,  # over PIXEL_LIMIT
    "class_b/bomb.png": TOO_MANY_PIXELS,  # its header claims 100,000 x 100,000
}
GOOD = 4 + 4 + 2 + 1  # class_a, class_b, the linked-in outside folder, the animated GIF
ALL_SKIPS = {**SCAN_SKIPS, **DECODE_SKIPS}


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    stub = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stub) + chunk(b"IEND", b"")


def _jpeg(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _gif(colours: list[tuple[int, int, int]]) -> bytes:
    """An animated GIF, one 16 x 16 frame per colour."""
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _images(folder: Path, count: int, colour: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (16, 16), (colour, 10 * i, 0)).save(folder / f"{i:03d}.png")


def make_hostile_folder(base: Path) -> Path:
    """``base/root``: two classes of good images and every kind of trouble listed above."""
    root = base / "root"
    _images(root / "class_a", 4, 40)
    _images(root / "class_b", 4, 200)
    _images(base / "outside", 2, 120)  # linked in from class_b: legitimately outside the root
    (root / "class_b" / "linked").symlink_to(base / "outside")
    (root / "class_a" / "loop").symlink_to("..")
    (root / "class_a" / "alias_b").symlink_to("../class_b")
    (root / "class_b" / "sub").mkdir()
    (root / "class_b" / "sub" / "up").symlink_to("../../..")
    (root / "class_b" / "dangling.jpg").symlink_to(base / "nowhere.jpg")
    _images(root / "class_b" / "x.jpg", 1, 0)  # a directory named like an image (with an image inside)
    (root / "class_a" / "empty.jpg").write_bytes(b"")
    (root / "class_a" / "truncated.jpg").write_bytes(_jpeg()[:300])
    (root / "class_a" / "text.jpg").write_text("this is not a picture\n")
    (root / "class_a" / "anim.gif").write_bytes(_gif([(255, 0, 0), (0, 0, 255)]))
    Image.new("RGB", (64, 64)).save(root / "class_b" / "big.png")
    (root / "class_b" / "bomb.png").write_bytes(_png(100_000, 100_000))
    return root


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hostile_folder(tmp_path_factory.mktemp("hostile"))


def _relative(root: Path, skips) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {os.path.relpath(s.path, root): s.reason for s in skips}


class TestScan:
    def test_each_folder_once_and_every_skip_named(self, hostile: Path) -> None:
        index = ImageFolderIndex.scan(hostile)
        assert len(index.paths) == GOOD + len(DECODE_SKIPS)  # os.walk(followlinks=True) lists thousands
        assert len(set(map(os.path.realpath, index.paths))) == len(index.paths)
        assert _relative(hostile, index.skipped) == SCAN_SKIPS
        assert index.classes == ("class_a", "class_b")
        linked = [p for p in index.paths if "/linked/" in p]
        assert len(linked) == 2 and {index.labels[index.paths.index(p)] for p in linked} == {1}

    def test_real_folder_wins_over_a_link_to_it(self, hostile: Path) -> None:
        paths = scan_folder(hostile).paths
        assert sum(p.startswith("class_b/") and p.endswith(".png") for p in paths) == 4 + 2 + 2  # + big, bomb
        assert not any(p.startswith("class_a/alias_b/") for p in paths)

    def test_a_link_to_itself_is_a_loop(self, tmp_path: Path) -> None:
        _images(tmp_path / "c", 1, 0)
        (tmp_path / "c" / "self").symlink_to("self")
        (tmp_path / "me").symlink_to("me")
        scan = scan_folder(tmp_path)
        assert scan.paths == ("c/000.png",)
        assert {s.path: s.reason for s in scan.skipped} == {"c/self": VISITED, "me": VISITED}

    def test_index_cache_keeps_the_scan_skips(
        self, hostile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import ibot.data.datasets as datasets

        first = ImageFolderIndex.scan(hostile, tmp_path / "cache")
        monkeypatch.setattr(datasets, "scan_folder", lambda root: pytest.fail("re-scanned an unchanged folder"))
        again = ImageFolderIndex.scan(hostile, tmp_path / "cache")
        assert again == first and _relative(hostile, again.skipped) == SCAN_SKIPS

    def test_a_version_1_cache_is_not_read(self, hostile: Path, tmp_path: Path) -> None:
        from ibot.data.datasets import _fingerprint
        from ibot.data.index_cache import cache_path, write_cache

        old = cache_path(tmp_path, "index", str(hostile.resolve()))
        write_cache(old, _fingerprint(hostile), ["class_a/loop/class_a/000.png"])  # what v1 cached
        assert len(ImageFolderIndex.scan(hostile, tmp_path).paths) == GOOD + len(DECODE_SKIPS)


class TestDecode:
    def test_every_file_decodes_or_is_skipped_with_its_reason(self, hostile: Path) -> None:
        dataset = ImageFolder(hostile, lambda image: image, max_pixels=PIXEL_LIMIT)
        items = [dataset[i] for i in range(len(dataset))]
        assert _relative(hostile, [s for s in items if isinstance(s, Skip)]) == DECODE_SKIPS
        assert sum(not isinstance(s, Skip) for s in items) == GOOD
        assert _relative(hostile, dataset.skips) == ALL_SKIPS  # scan and decoding in one log

    def test_animated_gif_gives_its_first_frame(self, hostile: Path) -> None:
        image = decode_rgb(str(hostile / "class_a" / "anim.gif"), "anim.gif")
        assert image.mode == "RGB" and image.getpixel((8, 8)) == (255, 0, 0)

    def test_bomb_header_is_refused_at_the_default_limit(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
        assert decode_rgb(_png(100_000, 100_000), "bomb") == Skip("bomb", TOO_MANY_PIXELS)
        assert decode_rgb(_png(10_000, 10_000), "warn") == Skip("warn", TOO_MANY_PIXELS)  # PIL only warns here
        # No limit: the header passes and the stub pixel data is what fails.
        assert decode_rgb(_png(100_000, 100_000), "bomb", max_pixels=0) == Skip("bomb", UNREADABLE)
        assert DEFAULT_MAX_PIXELS == load_config(None, []).data.max_image_pixels

    def test_tar_members_get_the_same_reasons(self, tmp_path: Path) -> None:
        members = {
            "a.jpg": b"",
            "b.jpg": _jpeg()[:300],
            "c.jpg": b"not an image",
            "d.png": _png(100_000, 100_000),
            "e.jpg": _jpeg(),
            "f.gif": _gif([(0, 255, 0), (0, 0, 0)]),
        }
        with tarfile.open(tmp_path / "s.tar", "w") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        dataset = TarShards(tmp_path / "s.tar", lambda image: image)
        items = [dataset[i] for i in range(len(dataset))]
        shard = tmp_path / "s.tar"
        assert [s for s in items if isinstance(s, Skip)] == [
            Skip(f"{shard}:a.jpg", EMPTY),
            Skip(f"{shard}:b.jpg", UNREADABLE),
            Skip(f"{shard}:c.jpg", NOT_AN_IMAGE),
            Skip(f"{shard}:d.png", TOO_MANY_PIXELS),
        ]
        assert items[-1].view.getpixel((0, 0)) == (0, 255, 0)


def test_skip_log_dedupes_and_summarises(tmp_path: Path) -> None:
    log = SkipLog([Skip("b", EMPTY), Skip("a", NOT_AN_IMAGE), Skip("c", EMPTY), Skip("d", EMPTY)])
    log.extend([Skip("b", EMPTY), Skip("a", UNREADABLE)])  # the next epoch: same files, counted once
    assert len(log) == 4 and log.counts() == {EMPTY: 3, NOT_AN_IMAGE: 1}
    assert log.summary("x", "L") == "x: skipped 4 files (3 empty file, 1 not an image), e.g. a, b, c, ...; list in L"
    from ibot.data.skips import write_tsv

    assert read_tsv(write_tsv(log, tmp_path / "s.tsv")) == log.sorted()


# --- commands: one summary line, the full list on disk, the counts in the JSON -------------------------


def _summaries(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{what}: skipped")]


def _check_list(path: Path, root: Path, expected: dict[str, str]) -> None:
    lines = path.read_text().splitlines()
    assert lines[0] == "path\treason" and len(lines) == 1 + len(expected)
    assert _relative(root, read_tsv(path)) == expected


class _Capture:
    """Messages of the ``ibot`` loggers while in the block (caplog is function-scoped)."""

    def __enter__(self) -> list[str]:
        import logging

        self.records: list[str] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.records.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("ibot").addHandler(self.handler)
        return self.records

    def __exit__(self, *exc: object) -> None:
        import logging

        logging.getLogger("ibot").removeHandler(self.handler)


@pytest.fixture(scope="module")
def hostile_run(hostile: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny pre-training on the hostile folder (2 epochs: every image is drawn twice).

    Its k-NN monitor reads another folder, with one text file named .png and one dangling link.
    """
    from ibot.eval.monitor import KNNMonitor
    from ibot.train.loop import train

    base = tmp_path_factory.mktemp("run")
    run, monitored = base / "run", base / "monitored"
    _images(monitored / "class_0", 3, 10)
    _images(monitored / "class_1", 3, 250)
    (monitored / "class_0" / "bad.png").write_text("not a picture")
    (monitored / "class_1" / "gone.png").symlink_to(base / "nowhere.png")
    monitor = [f"eval.train_path={monitored}", f"eval.test_path={monitored}", "eval.monitor_every_minutes=1000"]
    monitor += ["eval.monitor_train_images=100", "eval.monitor_test_images=100", "eval.monitor_k=2"]
    cfg = load_config(None, tiny_overrides(hostile, run) + [f"data.max_image_pixels={PIXEL_LIMIT}", *monitor])
    with _Capture() as records:
        result = train(cfg, progress=False, monitor=KNNMonitor)
    return run, result, records


def test_pretrain_reports_each_skipped_file_once(hostile: Path, hostile_run) -> None:  # type: ignore[no-untyped-def]
    run, result, records = hostile_run
    monitored = f"../../{run.parent.name}/monitored"  # relative to the hostile root
    expected = {
        **ALL_SKIPS,
        f"{monitored}/class_0/bad.png": NOT_AN_IMAGE,
        f"{monitored}/class_1/gone.png": DANGLING_LINK,
    }
    assert result.skipped_images == len(expected)  # 2 epochs, yet each decode failure counted once
    _check_list(run / "skipped.tsv", hostile, expected)
    lines = [m for m in records if m.startswith("pretrain: skipped")]
    assert len(lines) == 1
    assert lines[0].startswith(f"pretrain: skipped {len(expected)} files (3 {VISITED}, 2 {DANGLING_LINK}, ")
    assert lines[0].endswith(f"; list in {run / 'skipped.tsv'}")


def test_eval_knn_prints_one_line_and_writes_the_list(hostile: Path, hostile_run) -> None:  # type: ignore[no-untyped-def]
    run = hostile_run[0]
    folder = str(hostile)
    args = ["eval", "knn", str(run), "--train-dir", folder, "--test-dir", folder, "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "ibot", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "skipped" in x]  # the one summary line
    listed = run / "eval" / "skipped-knn.tsv"
    counts = Counter(ALL_SKIPS.values())
    assert f" eval knn: skipped {len(ALL_SKIPS)} files (" in line and f"{counts[VISITED]} {VISITED}" in line
    first = sorted(str(hostile / p) for p in ALL_SKIPS)[:3]
    assert line.endswith(f"e.g. {', '.join(first)}, ...; list in {listed}")
    assert "| weights |" in done.stdout  # the table, as before
    _check_list(listed, hostile, ALL_SKIPS)
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert result["skipped_images"] == len(ALL_SKIPS) and result["skipped_by_reason"] == dict(counts)
    assert result["train_images"] == result["test_images"] == GOOD


def test_visualize_writes_its_list_next_to_the_picture(
    hostile: Path, hostile_run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    from ibot.cli import main

    out = tmp_path / "pics" / "attention.png"
    args = ["visualize", "attention", str(hostile_run[0]), "--images", str(hostile), "--count", "16"]
    with caplog.at_level("WARNING"):
        assert main([*args, "--output", str(out)]) == 0
    assert len(_summaries(caplog, "visualize attention")) == 1
    _check_list(out.parent / "skipped-attention.tsv", hostile, ALL_SKIPS)  # 16 picks: every file is tried
