"""Hostile input for every ``ibot`` command, on one planted messy setup (issue 28: the class of
defect, not its instances).

One setup is planted once per module in a temporary folder: labelled folders whose class sets
differ, a folder in which nothing decodes, broken files among good ones, a binary file called a
config, and one tiny pre-trained run. Every test works on its own copy of that run, so a command
that wrongly writes cannot spoil the next test. What is asserted, for every command:

- the exit code;
- a refusal is one ``ibot: error:`` line naming the culprit (file, option, class or PID), never a
  traceback;
- a refused command leaves the run folder and the planted inputs byte-identical (every file's
  bytes and the set of names, hidden files included).

The table ``COMMANDS`` holds (argv, exit code, expected substring) per command: adding a command
is one line. Scenarios that need more than one call (caches, changed folders, the lock, a hang)
are tests of their own below it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ibot
from ibot.cli import main

from conftest import tiny_overrides

CLASSES = ("bird", "cat", "dog")
EXTRA_CLASS = "frog"  # in the test folder of one pair only: no train class to map it to
PER_CLASS = 4
SIZE = 16
LOCK_NAME = ".ibot.lock"
ERROR_LINE = re.compile(r"^ibot( [\w-]+)*: error: ")
EVAL_COMMANDS = ("knn", "retrieval", "probe", "robustness", "dense", "finetune", "cluster", "lowshot")
# Every evaluation sized to a second or two: one k, one probe at one lr, a few mosaics, ...
FAST_EVAL = [
    "train.threads=1",
    "eval.knn_k=[1]",
    "eval.batch_size=8",
    "eval.probes=[cls]",
    "eval.probe_lrs=[0.01]",
    "eval.probe_max_extensions=0",
    "eval.probe_epochs=1",
    "eval.probe_batch_size=4",
    "eval.dense_train_mosaics=4",
    "eval.dense_test_mosaics=2",
    "eval.robustness_images=2",
    "eval.cluster_restarts=1",
    "eval.lowshot_shots=[1]",
    "eval.lowshot_fractions=[]",
    "eval.lowshot_draws=[0]",
    "eval.lowshot_knn_k=1",
    "finetune.epochs=1",
    "finetune.batch_size=4",
    "finetune.num_workers=0",
]


# --- the planted setup ---------------------------------------------------------------------------
def write_image(path: Path, colour: np.ndarray, seed: int) -> None:
    """A small PNG: noise around ``colour`` (one colour per class, so classes are separable)."""
    noise = np.random.default_rng(seed).integers(-30, 30, size=(SIZE, SIZE, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(path)


def colour_of(name: str) -> np.ndarray:
    return np.random.default_rng(sum(name.encode())).integers(0, 256, size=3)


def make_classes(root: Path, classes: tuple[str, ...], seed: int = 0) -> Path:
    """``PER_CLASS`` images per class folder; the same ``seed`` gives byte-identical files."""
    for c, name in enumerate(classes):
        for i in range(PER_CLASS):
            write_image(root / name / f"{i:02d}.png", colour_of(name), seed * 1000 + c * 100 + i)
    return root


def plant_broken(folder: Path, stem: str) -> None:
    """Two files that do not decode: text named .jpg, a truncated PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}-text.jpg").write_text("not an image\n")
    good = folder / f"{stem}-good.png"
    write_image(good, np.array([128, 128, 128]), 99)
    data = good.read_bytes()
    good.unlink()
    (folder / f"{stem}-truncated.png").write_bytes(data[: len(data) // 3])


@dataclass(frozen=True)
class Planted:
    """The module's messy setup (read-only for the tests: each one copies what it changes)."""

    root: Path
    data: Path  # the planted inputs: every refused command must leave them as they were
    train: Path  # bird, cat, dog + two broken files
    extra: Path  # bird, cat, dog, frog: frog has no train class
    missing: Path  # bird and dog, the same bytes as train's: cat is absent (fine)
    broken: Path  # nothing decodes
    messy: Path  # train's classes, nested folders, the last file in sorted order broken
    config: Path  # "{}": the tiny run lives in the overrides
    binary: Path  # bytes, not YAML
    variants: Path  # one ablation variant
    garbage_pt: Path  # a "checkpoint" of random bytes
    image: Path  # one query image
    run: Path  # one tiny finished pre-training run

    def overrides(self, output_dir: Path | str, data: Path | None = None) -> list[str]:
        return [*tiny_overrides(data or self.train, Path(output_dir)), *FAST_EVAL]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    train = make_classes(data / "train", CLASSES)
    plant_broken(train / "cat", "x")
    extra = make_classes(data / "extra", (*CLASSES, EXTRA_CLASS))
    missing = make_classes(data / "missing", ("bird", "dog"))
    for name in ("bird", "dog"):  # byte-identical to train's: k = 1 must find each one itself
        for path in (train / name).iterdir():
            shutil.copy2(path, missing / name / path.name)
    broken = data / "broken"
    for name in ("a", "b"):
        plant_broken(broken / name, name)
    messy = make_classes(data / "messy", CLASSES, seed=3)
    write_image(messy / "dog" / "nested" / "deeper" / "n0.png", colour_of("dog"), 7)
    write_image(messy / "bird" / "nested" / "n1.png", colour_of("bird"), 8)
    plant_broken(messy / "dog", "zz")  # "dog/zz-truncated.png": the last of the sorted list
    config = data / "config.yaml"
    config.write_text("{}\n")
    binary = data / "garbage.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    variants = data / "variants.yaml"
    variants.write_text("variants:\n  plain: []\n")
    garbage_pt = data / "garbage.pt"
    garbage_pt.write_bytes(np.random.default_rng(0).bytes(4096))
    image = train / "bird" / "00.png"
    run = root / "base-run"
    argv = ["pretrain", "--config", str(config), "--no-progress"]
    argv += [*tiny_overrides(train, run), *FAST_EVAL, f"eval.train_path={train}", f"eval.test_path={train}"]
    assert main(argv) == 0
    return Planted(root, data, train, extra, missing, broken, messy, config, binary, variants, garbage_pt, image, run)


@pytest.fixture
def run(planted: Planted, tmp_path: Path) -> Path:
    """This test's own copy of the finished run, alone in a folder (``box``) of its own."""
    copy = tmp_path / "box" / "myrun"
    shutil.copytree(planted.run, copy, symlinks=True)
    return copy


# --- how a command is run and judged ---------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    code: int | None  # None: an exception escaped ibot.cli.main
    out: str
    err: str
    log: str = ""

    @property
    def text(self) -> str:
        return self.out + self.err + self.log


def cli(argv: list[str], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture | None = None) -> Outcome:
    """``ibot.cli.main(argv)`` in-process; an exception that escapes it is a traceback on stderr."""
    capsys.readouterr()
    if caplog is not None:
        caplog.clear()
    try:
        code: int | None = main(argv)
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:
        captured = capsys.readouterr()
        return Outcome(None, captured.out, captured.err + traceback.format_exc())
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err, caplog.text if caplog is not None else "")


def error_line(outcome: Outcome) -> str:
    """The one ``ibot: error:`` line of a refusal (argparse's ``ibot <command>: error:`` counts too)."""
    assert "Traceback" not in outcome.err, outcome.err
    lines = [line for line in outcome.err.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, f"expected one 'ibot: error:' line on stderr, got:\n{outcome.err}"
    return lines[0]


def assert_refused(outcome: Outcome, *names: str) -> str:
    assert outcome.code == 2, f"exit {outcome.code}, expected 2 (refused)\n{outcome.err}"
    line = error_line(outcome)
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


def snapshot(*folders: Path) -> dict[str, str]:
    """Every path under ``folders`` (hidden ones too) -> the sha256 of its bytes ("dir" / "link:...")."""
    found: dict[str, str] = {}
    for folder in folders:
        found[str(folder)] = "dir" if folder.is_dir() else "missing"
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path.is_symlink():
                    found[str(path)] = f"link:{os.readlink(path)}"
                elif path.is_dir():
                    found[str(path)] = "dir"
                else:
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_unchanged(before: dict[str, str], after: dict[str, str], what: str) -> None:
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not (added or removed or changed), f"{what} changed: added {added}, removed {removed}, changed {changed}"


def expand(template: str, planted: Planted, run: Path, tmp: Path) -> list[str]:
    """A table row's argv: ``{name}`` -> a planted path; the word ``{tiny}`` -> a tiny run's overrides
    (output in ``tmp/out``); ``{tiny:FOLDER}`` -> the same pre-training on another planted folder."""
    paths = {k: str(v) for k, v in vars(planted).items()} | {"run": str(run), "tmp": str(tmp)}
    argv: list[str] = []
    for word in template.split():
        if word.startswith("{tiny"):
            folder = Path(paths[word[6:-1]]) if ":" in word else planted.train
            argv += planted.overrides(tmp / "out", folder) + [f"eval.train_path={planted.train}"]
            argv += [f"eval.test_path={planted.train}"]
        else:
            argv.append(word.format(**paths))
    return argv


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- one line per command ------------------------------------------------------------------------------
EVAL = "--no-progress"
COMMANDS: list[tuple] = [
    # id, argv ({name}: a planted path; {run}: this test's copy of the run; {tmp}: its tmp_path), exit code,
    # a substring of the output (of the error line when refused)[, a substring the output must not hold]
    ("help", "--help", 0, "pretrain"),
    ("eval-help", "eval --help", 0, "lowshot"),
    ("eval-lowshot-help", "eval lowshot --help", 0, "--train-dir"),
    # pre-training: new, into a run, resumed wrongly, on a binary config, on nothing decodable
    ("pretrain-new-messy", "pretrain --config {config} --no-progress {tiny:messy} train.max_steps=1", 0, "done"),
    ("pretrain-into-a-run", "pretrain --config {config} --no-progress {tiny} train.output_dir={run}", 2, "myrun"),
    ("pretrain-binary-config", "pretrain --config {binary} --no-progress {tiny}", 2, "garbage.yaml"),
    # an override's typo is the command line's, not the YAML file's
    (
        "pretrain-typo-override",
        "pretrain --config {config} --no-progress {tiny} data.batch_sise=4",
        2,
        "batch_sise",
        "config.yaml",
    ),
    (
        "resume-other-data",
        "pretrain --config {config} --resume --no-progress {tiny} train.output_dir={run} data.path={missing}",
        2,
        "data.path",
    ),
    (
        "resume-other-batch",
        "pretrain --config {config} --resume --no-progress {tiny} train.output_dir={run} data.batch_size=2",
        2,
        "batch_size",
    ),
    (
        "resume-nothing",
        "pretrain --config {config} --resume --no-progress {tiny} train.output_dir={tmp}/none",
        2,
        "none",
    ),
    # every evaluation on a test folder lacking a train class (fine) and on one with an extra class (refused);
    # on the same images each one runs in test_a_locked_run_folder_refuses_every_writer once the lock is gone
    *[
        (f"{c}-lacks", f"eval {c} {{run}} --train-dir {{train}} --test-dir {{missing}} {EVAL}", 0, "|")
        for c in EVAL_COMMANDS
    ],
    *[
        (f"{c}-extra-class", f"eval {c} {{run}} --train-dir {{train}} --test-dir {{extra}} {EVAL}", 2, EXTRA_CLASS)
        for c in EVAL_COMMANDS
        if c != "cluster"  # clusters one folder: no train classes to map to
    ],
    ("knn-default-folders", f"eval knn {{run}} {EVAL}", 0, "k=1"),
    ("knn-gone-default", f"eval knn {{run}} {EVAL} eval.train_path={{tmp}}/gone", 2, "eval.train_path"),
    ("knn-all-broken", f"eval knn {{run}} --train-dir {{broken}} --test-dir {{train}} {EVAL}", 2, "broken"),
    # random bytes are no pickle-security problem
    (
        "knn-garbage-weights",
        f"eval knn {{garbage_pt}} --train-dir {{train}} --test-dir {{train}} {EVAL}",
        2,
        "garbage.pt",
        "arbitrary objects",
    ),
    ("knn-binary-weights", f"eval knn {{binary}} --train-dir {{train}} --test-dir {{train}} {EVAL}", 2, "garbage.yaml"),
    # embed / retrieve
    ("embed-messy", "embed {run} --images {messy} --out {tmp}/emb.npy --no-progress", 0, "embeddings"),
    ("embed-all-broken", "embed {run} --images {broken} --out {tmp}/emb.npy --no-progress", 2, "broken"),
    ("retrieve", "retrieve {run} --index {messy} --query {image} --no-progress", 0, "contact sheet"),
    ("retrieve-out", "retrieve {run} --index {train} --query {image} --out {tmp}/r --no-progress", 0, "contact sheet"),
    # export (the --out rules that protect the run are a test of their own below)
    ("export-timm", "export {run} --format timm --out {tmp}/timm", 0, "max abs diff"),
    ("export-hf", "export {run} --format hf --out {tmp}/hf", 0, "max abs diff"),
    ("export-garbage", "export {garbage_pt} --format timm --out {tmp}/x", 2, "garbage.pt"),
    # visualize: every kind on the messy folder (correspondences' second pick is a broken file)
    ("visualize-attention", "visualize attention {run} --images {messy} --count 4 --output {tmp}/a.png", 0, "a.png"),
    ("visualize-clusters", "visualize clusters {run} --images {messy} --count 4 --clusters 2", 0, "clusters.png"),
    ("visualize-pca", "visualize pca {run} --images {messy} --count 4 --output {tmp}/p.png", 0, "p.png"),
    ("visualize-correspondences", "visualize correspondences {run} --images {messy} --output {tmp}/c.png", 0, "c.png"),
    ("visualize-default-images", "visualize attention {run} --count 2", 0, "attention.png"),
    ("visualize-count-negative", "visualize attention {run} --images {messy} --count -2", 2, "--count"),
    ("visualize-count-zero", "visualize attention {run} --images {messy} --count 0", 2, "--count"),
    ("visualize-clusters-zero", "visualize clusters {run} --images {messy} --clusters 0", 2, "--clusters"),
    ("visualize-all-broken", "visualize pca {run} --images {broken}", 2, "broken"),
    # report, ablate, demo
    ("report", "report {run}", 0, "report.md"),
    ("report-not-a-run", "report {train}", 2, "train"),
    (
        "ablate-messy",
        "ablate --config {config} --variants {variants} --seeds 0 --budget 1s --output-dir {tmp}/ablate "
        "--no-patch-probe --no-progress {tiny:messy} eval.monitor_train_images=4 eval.monitor_test_images=4 "
        "eval.monitor_k=1",
        0,
        "plain",
    ),
    (
        "ablate-binary-config",
        "ablate --config {binary} --variants {variants} --budget 1m --output-dir {tmp}/a {tiny}",
        2,
        "garbage.yaml",
    ),
    (
        "ablate-binary-variants",
        "ablate --config {config} --variants {binary} --budget 1m --output-dir {tmp}/a {tiny}",
        2,
        "garbage.yaml",
    ),
    ("demo", "demo --config {config} --init-seeds 1 --no-progress {tiny:messy} optim.epochs=1", 0, "k-NN table"),
    ("demo-binary-config", "demo --config {binary} --no-progress {tiny}", 2, "garbage.yaml"),
]


@pytest.mark.parametrize(
    "template, code, expected, absent",
    [pytest.param(*row[1:4], row[4] if len(row) > 4 else None, id=row[0]) for row in COMMANDS],
)
def test_command(
    template: str,
    code: int,
    expected: str,
    absent: str | None,
    planted: Planted,
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Exit code and message; a refused command writes nothing: the run and the planted inputs stay
    byte-identical, and nothing appears elsewhere but a list of the skipped files that explains it."""
    caplog.set_level(logging.INFO)
    before = snapshot(tmp_path, planted.data)
    outcome = cli(expand(template, planted, run, tmp_path), capsys, caplog)
    line = outcome.text
    if code == 0:
        assert "Traceback" not in outcome.err, outcome.err
        assert outcome.code == 0, f"exit {outcome.code}\n{outcome.err}"
        assert expected in outcome.text
    else:
        line = assert_refused(outcome, expected)
        after = snapshot(tmp_path, planted.data)
        for path in set(after) - set(before):  # beside an output outside the run: allowed
            if "skipped" in Path(path).name and not Path(path).is_relative_to(run):
                after.pop(path)
        assert_unchanged(before, after, "a refused command's run folder or inputs")
    if absent:
        assert absent not in line, f"{absent!r} should not be in: {line}"


# --- labels by class name -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, score",
    [
        pytest.param("knn", lambda r: r["knn"]["1"]["top1"], id="knn"),
        pytest.param("retrieval", lambda r: r["recall_at_1"], id="retrieval"),
    ],
)
def test_a_test_folder_lacking_a_train_class_scores_as_the_same_images(
    command: str, score, planted: Planted, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """k = 1 on images identical to train ones: 100.00 whether or not the test folder has every class."""
    results = []
    for test_dir in (planted.train, planted.missing):
        out = tmp_path / f"{test_dir.name}.json"
        argv = ["eval", command, str(run), "--train-dir", str(planted.train), "--test-dir", str(test_dir)]
        outcome = cli([*argv, "--no-progress", "--json", str(out)], capsys)
        assert outcome.code == 0, outcome.err
        results.append(score(read_json(out)))
    assert results == [100.0, 100.0]


# --- caches that cannot lie ---------------------------------------------------------------------------------
def knn_top1(run: Path, train: Path, test: Path, tmp: Path, capsys, *extra: str, caplog=None) -> tuple[float, Outcome]:
    """k = 1 top-1 of ``ibot eval knn`` (read from its --json) and the call's outcome."""
    out = tmp / "knn.json"
    argv = ["eval", "knn", str(run), "--train-dir", str(train), "--test-dir", str(test), "--no-progress"]
    outcome = cli([*argv, "--json", str(out), *extra], capsys, caplog)
    assert outcome.code == 0, outcome.err
    return float(read_json(out)["knn"]["1"]["top1"]), outcome


def test_images_overwritten_under_the_same_names_after_a_cached_eval(
    planted: Planted, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bird's and dog's files swap contents (same names, same count, folder mtimes unchanged): the
    cached k-NN must equal a fresh computation, not repeat the old 100.00."""
    test = tmp_path / "test"
    shutil.copytree(planted.train, test)
    assert knn_top1(run, planted.train, test, tmp_path, capsys)[0] == 100.0
    for i in range(PER_CLASS):
        bird, dog = test / "bird" / f"{i:02d}.png", test / "dog" / f"{i:02d}.png"
        bird_bytes, dog_bytes = bird.read_bytes(), dog.read_bytes()
        with open(bird, "r+b") as f:  # rewritten in place: no folder's entries change
            f.truncate(0)
            f.write(dog_bytes)
        with open(dog, "r+b") as f:
            f.truncate(0)
            f.write(bird_bytes)
    cached = knn_top1(run, planted.train, test, tmp_path, capsys)[0]
    fresh = knn_top1(run, planted.train, test, tmp_path, capsys, "--cache-dir", str(tmp_path / "fresh-cache"))[0]
    assert fresh < 100.0  # bird and dog now look like each other's train images
    assert cached == fresh


def test_nested_changes_two_levels_deep_are_seen(
    planted: Planted, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the file-index cache on, images added under dog/nested and deleted under bird/nested
    after a listing: the embedded rows and the k-NN image count follow the folder."""
    folder = tmp_path / "images"
    shutil.copytree(planted.train, folder)
    for i in range(3):
        write_image(folder / "bird" / "nested" / f"gone{i}.png", colour_of("bird"), 50 + i)
    # dog/nested exists before the listing: adding to it changes no mtime the old index looked at.
    write_image(folder / "dog" / "nested" / "kept.png", colour_of("dog"), 55)
    index_cache = f"data.index_cache={tmp_path / 'index-cache'}"

    def embedded(name: str) -> tuple[int, str]:
        out = tmp_path / f"{name}.npy"
        argv = ["embed", str(run), "--images", str(folder), "--out", str(out), "--no-progress", index_cache]
        outcome = cli(argv, capsys)
        assert outcome.code == 0, outcome.err
        return int(np.load(out).shape[0]), (tmp_path / f"{name}.npy.paths.tsv").read_text()

    def knn_images() -> int:
        out = tmp_path / "knn.json"
        argv = ["eval", "knn", str(run), "--train-dir", str(folder), "--test-dir", str(planted.train)]
        outcome = cli([*argv, "--no-progress", "--json", str(out), index_cache], capsys)
        assert outcome.code == 0, outcome.err
        return int(read_json(out)["train_images"])

    good = len(CLASSES) * PER_CLASS + 3 + 1
    assert embedded("before")[0] == good and knn_images() == good
    for i in range(5):
        write_image(folder / "dog" / "nested" / f"added{i}.png", colour_of("dog"), 60 + i)
    for i in range(2):
        (folder / "bird" / "nested" / f"gone{i}.png").unlink()
    rows, listed = embedded("after")
    assert rows == good + 5 - 2
    assert "added4.png" in listed and "gone0.png" not in listed and "gone2.png" in listed
    assert knn_images() == good + 5 - 2


def about_the_cache(caplog: pytest.LogCaptureFixture, outcome: Outcome, files: list[Path]) -> list[str]:
    """Warnings (logged, or on stderr) that name a cache file or say "cache" outside a path: the skip
    summary does neither (its list's path holds this test's name, ``..._feature_cache0/...``)."""
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] + outcome.err.splitlines()

    def says_cache(line: str) -> bool:
        return "cache" in " ".join(word for word in line.lower().split() if "/" not in word)

    return [line for line in lines if says_cache(line) or any(f.name in line for f in files)]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupted_feature_cache_is_recomputed_with_a_warning(
    damage: str,
    planted: Planted,
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cache file that does not load is a warning, the features are recomputed, the result is right."""
    first, _ = knn_top1(run, planted.train, planted.train, tmp_path, capsys)
    cached = sorted((run / "features").iterdir())
    assert cached, "eval knn wrote no feature cache"
    for path in cached:
        data = path.read_bytes()
        path.write_bytes({"garbage": b"\x00garbage" * 64, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    again, outcome = knn_top1(run, planted.train, planted.train, tmp_path, capsys, caplog=caplog)
    assert again == first
    assert "Traceback" not in outcome.err, outcome.err
    assert about_the_cache(caplog, outcome, cached), "no warning about the unreadable cache file"
    # Recomputed and stored again: a third run reads it back without a word about the cache.
    third, outcome = knn_top1(run, planted.train, planted.train, tmp_path, capsys, caplog=caplog)
    assert third == first
    assert not about_the_cache(caplog, outcome, cached) and "Traceback" not in outcome.err


# --- a run folder is owned -------------------------------------------------------------------------------
HOLDER = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0)
f.truncate()
f.write(f"{os.getpid()}\\n")
f.flush()
print(os.getpid(), flush=True)
time.sleep(600)
"""

WRITERS: list[tuple[str, str]] = [
    # id, argv of a command that writes into {run}
    ("resume", "pretrain --config {config} --resume --no-progress {tiny} train.output_dir={run}"),
    *[(c, f"eval {c} {{run}} --train-dir {{train}} --test-dir {{train}} {EVAL}") for c in EVAL_COMMANDS],
    ("retrieve", "retrieve {run} --index {train} --query {image} --no-progress"),
    ("visualize", "visualize attention {run} --images {train} --count 2"),
    ("report", "report {run}"),
]


@pytest.mark.parametrize("template", [pytest.param(row[1], id=row[0]) for row in WRITERS])
def test_a_locked_run_folder_refuses_every_writer(
    template: str, planted: Planted, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process holds ``RUN/.ibot.lock`` (flock): one line naming its PID, nothing written;
    once it is killed (-9: the OS drops the lock) the same command succeeds."""
    argv = expand(template, planted, run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        pid = holder.stdout.readline().strip()  # printed once the lock is held
        assert pid == str(holder.pid)
        before = snapshot(run, planted.data)
        assert_refused(cli(argv, capsys), pid)
        assert_unchanged(before, snapshot(run, planted.data), "a locked run folder")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    outcome = cli(argv, capsys)
    assert outcome.code == 0 and "Traceback" not in outcome.err, outcome.err


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(None, id="all-but-checkpoints"),
        pytest.param({"teacher.safetensors"}, id="weights-only"),
        pytest.param({"metrics.jsonl"}, id="metrics-only"),
    ],
)
def test_a_new_run_refuses_a_folder_holding_run_artefacts(
    keep: set[str] | None, planted: Planted, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No step checkpoint left (deleted by the user), but weights or metrics: refused, nothing written."""
    for path in run.iterdir():
        if path.name.startswith("checkpoint") if keep is None else path.name not in keep | {LOCK_NAME}:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    assert any(run.iterdir())
    before = snapshot(run)
    argv = ["pretrain", "--config", str(planted.config), "--no-progress"]
    outcome = cli([*argv, *planted.overrides(run), "train.max_steps=1"], capsys)
    assert_refused(outcome, run.name)
    assert_unchanged(before, snapshot(run), "the folder a new run was refused")


def test_resuming_a_finished_run_says_so_and_writes_nothing(
    planted: Planted,
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    before = snapshot(run)
    argv = ["pretrain", "--config", str(planted.config), "--resume", "--no-progress", *planted.overrides(run)]
    outcome = cli(argv, capsys, caplog)
    assert outcome.code == 0 and "Traceback" not in outcome.err, outcome.err
    assert "already finished" in outcome.text
    after = snapshot(run)
    lock = str(run / LOCK_NAME)  # a lock holder may write its PID there: that is no run artefact
    before.pop(lock, None)
    after.pop(lock, None)
    assert_unchanged(before, after, "a finished run resumed")


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize(
    "out, cwd, fmt",
    [
        pytest.param("{run}", "{box}", "onnx", id="run-onnx"),  # the issue's: deleted the run
        pytest.param("{run}", "{box}", "timm", id="run"),
        pytest.param(".", "{box}", "timm", id="dot-parent"),
        pytest.param(".", "{run}", "timm", id="dot-run"),
        pytest.param("{run}/..", "{box}", "hf", id="run-dotdot"),
        pytest.param("{box}", "{box}", "timm", id="parent"),
        pytest.param("{run}/exported", "{box}", "timm", id="inside"),
    ],
)
def test_export_refuses_an_out_that_is_holds_or_lies_in_the_run(
    out: str,
    cwd: str,
    fmt: str,
    force: bool,
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    box = run.parent
    monkeypatch.chdir(cwd.format(run=run, box=box))
    before = snapshot(tmp_path)
    argv = ["export", str(run), "--format", fmt, "--out", out.format(run=run, box=box)]
    line = assert_refused(cli([*argv, *(["--force"] if force else [])], capsys))
    assert "--out" in line or run.name in line, line
    assert_unchanged(before, snapshot(tmp_path), "the run and its folder after a refused export")


def test_embed_keeps_a_sidecar_it_did_not_write(
    planted: Planted, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``X.npy.paths.tsv`` of someone else next to a new ``X.npy``: refused without --force."""
    (tmp_path / "emb.npy.paths.tsv").write_text("mine\n")
    before = snapshot(tmp_path)
    outcome = cli(["embed", str(run), "--images", str(planted.train), "--out", str(tmp_path / "emb.npy")], capsys)
    assert_refused(outcome, "--force")
    assert_unchanged(before, snapshot(tmp_path), "an existing sidecar")


# --- every loop ends ------------------------------------------------------------------------------------
def test_pretraining_on_a_folder_where_nothing_decodes_stops_with_one_line(planted: Planted, tmp_path: Path) -> None:
    """Not a hang: exit 2 within the timeout, one line saying that no image decoded."""
    argv = [sys.executable, "-m", "ibot", "pretrain", "--config", str(planted.config), "--no-progress"]
    argv += planted.overrides(tmp_path / "run", planted.broken)
    env = {**os.environ, "PYTHONPATH": str(Path(ibot.__file__).resolve().parents[1])}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("pre-training on a folder in which nothing decodes still ran after 60 s")
    outcome = Outcome(done.returncode, done.stdout, done.stderr)
    assert_refused(outcome, "decoded")
