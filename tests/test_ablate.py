"""``ibot ablate``: variants x seeds under one budget, a table of mean +/- std, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ibot.ablate import format_ablation, load_variants, mean_std, run_ablation, run_config
from ibot.cli import main
from ibot.errors import ConfigError

from conftest import make_image_folder, tiny_overrides


def _variants(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "variants.yaml"
    path.write_text(text)
    return path


def test_variants_file_is_checked(tmp_path: Path) -> None:
    good = load_variants(_variants(tmp_path, "variants:\n  online: []\n  none: [mim.target=none]\n"))
    assert good == {"online": [], "none": ["mim.target=none"]}
    with pytest.raises(ConfigError, match="variants.yaml"):
        load_variants(_variants(tmp_path, "online: []\n"))
    with pytest.raises(ConfigError, match="variant 'x'"):
        load_variants(_variants(tmp_path, "variants:\n  x: mim.target=none\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_variants(tmp_path / "missing.yaml")


def test_a_binary_variants_file_is_one_line_naming_it(tmp_path: Path) -> None:
    """Bytes that are not UTF-8: the config loader's one line, not a UnicodeDecodeError."""
    path = tmp_path / "garbage.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="garbage.yaml: not a YAML text file"):
        load_variants(path)


def test_mean_std_and_table() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([4.0]) == (4.0, 0.0)
    rows = [
        {"variant": "b", "seed": 0, "knn_top1": 10.0, "steps": 5},
        {"variant": "a", "seed": 0, "knn_top1": 20.0, "steps": 5},
        {"variant": "a", "seed": 1, "knn_top1": 30.0, "steps": 7},
    ]
    table = format_ablation(rows, ["a", "b"]).splitlines()
    assert table[2] == "| a | 2 | 25.00 +/- 7.07 | 6 +/- 1 |"
    assert table[3] == "| b | 1 | 10.00 | 5 |"
    assert "patch probe" not in table[0]  # no run had one


def test_ablation_runs_scores_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=8)
    overrides = tiny_overrides(folder, tmp_path / "unused") + [
        f"eval.train_path={folder}",
        f"eval.test_path={folder}",
        "eval.monitor_k=3",
        "eval.monitor_train_images=12",
        "eval.monitor_test_images=4",
    ]
    variants = {"online": [], "none": ["mim.target=none"], "vq": ["mim.target=vq"]}
    out = tmp_path / "ablate"
    rows = run_ablation(None, overrides, variants, [0, 1], 0.02, out, patch_probe=False, progress=False)
    assert [(r["variant"], r["seed"]) for r in rows] == [(v, s) for v in variants for s in (0, 1)]
    for row in rows:
        assert 0 <= row["knn_top1"] <= 100 and row["steps"] >= 1
        assert row["cls_teacher_entropy"] > 0  # the final collapse monitors were read back
    none_rows = [r for r in rows if r["variant"] == "none"]
    assert all(r["patch_prototypes_used"] == 0 for r in none_rows)  # plain DINO: no masked patch
    table = (out / "ablation.md").read_text()
    assert "| online | 2 |" in table and "| vq | 2 |" in table
    # Different seeds, different runs.
    seed_runs = [
        json.loads((out / "online" / f"seed{s}" / "metrics.jsonl").read_text().splitlines()[0]) for s in (0, 1)
    ]
    assert seed_runs[0]["loss"] != seed_runs[1]["loss"]

    # Interrupted after one scored run: the others resume or start, the scored one is read back.
    for path in out.glob("*/seed1/ablation_result.json"):
        path.unlink()
    trained: list[str] = []
    import ibot.train.loop as loop  # run_ablation imports train lazily: patch it where it lives

    original = loop.train

    def counting_train(cfg, resume=False, progress=True, monitor=None):  # type: ignore[no-untyped-def]
        trained.append(f"{Path(cfg.train.output_dir).parent.name}/{Path(cfg.train.output_dir).name}:{resume}")
        return original(cfg, resume=resume, progress=progress, monitor=monitor)

    monkeypatch.setattr(loop, "train", counting_train)
    again = run_ablation(None, overrides, variants, [0, 1], 0.02, out, patch_probe=False, progress=False)
    assert sorted(trained) == ["none/seed1:True", "online/seed1:True", "vq/seed1:True"]
    assert [r["knn_top1"] for r in again[::2]] == [r["knn_top1"] for r in rows[::2]]  # seed 0 read back


def test_a_variant_killed_before_its_first_checkpoint_starts_over(tmp_path: Path) -> None:
    """Metrics but no checkpoint (killed early): a new run would refuse the folder; ablate starts it over."""
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    overrides = tiny_overrides(folder, tmp_path / "unused") + [f"eval.train_path={folder}", f"eval.test_path={folder}"]
    overrides += ["eval.monitor_k=1", "eval.monitor_train_images=4", "eval.monitor_test_images=4"]
    run = tmp_path / "ablate" / "online" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 3, "loss": 9.0}\n')
    (row,) = run_ablation(None, overrides, {"online": []}, [0], 0.01, tmp_path / "ablate", False, progress=False)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["steps"] >= 1 and lines  # trained and logged again from step 0
    assert all(line.get("loss") != 9.0 for line in lines)  # the killed run's line is gone


def test_cli_rejects_a_bad_override_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    variants = _variants(tmp_path, "variants:\n  online: []\n  typo: [mim.targte=none]\n")
    args = ["ablate", "--variants", str(variants), "--budget", "1s", "--output-dir", str(tmp_path / "out")]
    assert main(args + tiny_overrides(folder, tmp_path / "x")) == 2
    assert "mim.targte" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parent.parent.glob("configs/ablations/*.yaml")), ids=lambda p: p.name
)
def test_shipped_variants_files_parse(path: Path, tmp_path: Path) -> None:
    for name, overrides in load_variants(path).items():
        run_config("configs/cifar10.yaml", [], overrides, 0, 1.0, tmp_path / name)
