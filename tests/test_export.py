"""``ibot export``: each format loads in its own library and gives the backbone's tokens; bad input is one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ibot import export as export_module
from ibot.cli import main
from ibot.config import Config, load_config
from ibot.eval.features import load_frozen
from ibot.models.vit import MaskedViT
from ibot.storage import save_backbone

EVAL_SIZE = 24  # differs from the training size (16): the position embeddings must follow


def pico_config(*overrides: str) -> Config:
    base = [
        "model.arch=vit_pico",
        "model.patch_size=4",
        "data.global_crop_size=16",
        "data.local_crop_size=8",
        f"eval.image_size={EVAL_SIZE}",
        "eval.crop_ratio=0.75",
        "data.mean=[0.5,0.4,0.3]",
        "data.std=[0.2,0.25,0.3]",
    ]
    return load_config(None, [*base, *overrides])


def make_run(folder: Path, *overrides: str) -> Path:
    """A run folder holding a pico backbone whose every weight (norms and biases too) is random."""
    cfg = pico_config(*overrides)
    torch.manual_seed(0)
    backbone = MaskedViT.from_config(cfg.model, cfg.data.global_crop_size)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_backbone(folder / "teacher.safetensors", backbone.state_dict(), cfg.to_dict())
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


def ours(run: Path, images: torch.Tensor) -> torch.Tensor:
    backbone = load_frozen(str(run), on_cpu=True).backbone
    with torch.no_grad():
        out = backbone(images)
    return torch.cat([out.cls[:, None], out.patches], dim=1)


def images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_ok(run: Path, fmt: str, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "max abs diff" in printed
    return printed


def export_fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibot: error: ") and "\n" not in err
    return err


def test_timm_folder_loads_strictly_and_gives_our_tokens(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm

    out = tmp_path / "timm"
    export_ok(run, "timm", out, capsys)
    config = json.loads((out / "config.json").read_text())
    assert timm.is_model(config["architecture"])
    assert config["pretrained_cfg"]["input_size"] == [3, EVAL_SIZE, EVAL_SIZE]
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.4, 0.3] and config["pretrained_cfg"]["crop_pct"] == 0.75
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    stored = load_file(out / "model.safetensors")
    assert set(stored) == set(model.state_dict()) and "mask_token" not in stored
    model.load_state_dict(stored, strict=True)
    for size in (EVAL_SIZE, 16, 32):  # the training size, the evaluation size, one more
        with torch.no_grad():
            theirs = model.forward_features(images(size))
        assert (theirs - ours(run, images(size))).abs().max().item() <= 1e-5, size


def test_hf_folder_loads_every_weight_and_gives_our_tokens(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoImageProcessor, AutoModel

    out = tmp_path / "hf"
    export_ok(run, "hf", out, capsys)
    config = json.loads((out / "config.json").read_text())
    # timm's LayerNorm epsilon; transformers' default (1e-12) hides in the tolerance for most inputs.
    assert config["layer_norm_eps"] == 1e-6 and config["image_size"] == EVAL_SIZE
    model, info = AutoModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        theirs = model.eval()(pixel_values=images(EVAL_SIZE)).last_hidden_state
    assert (theirs - ours(run, images(EVAL_SIZE))).abs().max().item() <= 1e-4
    # Without add_pooling_layer=False only the (untrained, absent) pooler is new.
    _, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == [0.5, 0.4, 0.3] and list(processor.image_std) == [0.2, 0.25, 0.3]
    assert processor.size["height"] == processor.size["width"] == EVAL_SIZE


def test_onnx_has_a_dynamic_batch_and_gives_our_tokens(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime

    out = tmp_path / "onnx"
    printed = export_ok(run, "onnx", out, capsys)
    assert "exporter: torch.export (dynamo)" in printed
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # a named, free batch axis
    batch = images(EVAL_SIZE, batch=5)
    cls, patches = session.run(["cls", "patch_tokens"], {"images": batch.numpy()})
    theirs = torch.cat([torch.from_numpy(cls)[:, None], torch.from_numpy(patches)], dim=1)
    assert (theirs - ours(run, batch)).abs().max().item() <= 1e-4


def test_onnx_falls_back_to_the_torchscript_exporter(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        (args[2]).write_text("half a file")  # type: ignore[union-attr]
        raise RuntimeError("cannot trace")

    exporters = dict(export_module.ONNX_EXPORTERS, **{"torch.export (dynamo)": broken})
    monkeypatch.setattr(export_module, "ONNX_EXPORTERS", exporters)
    printed = export_ok(run, "onnx", tmp_path / "onnx", capsys)
    assert "exporter: TorchScript" in printed and "max abs diff" in printed


def test_a_failed_check_leaves_nothing(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "check_timm", lambda *args: 0.5)
    out = tmp_path / "parent" / "timm"
    err = export_fails([str(run), "--format", "timm", "--out", str(out)], capsys)
    assert "5.00e-01" in err and str(out) in err
    assert list((tmp_path / "parent").iterdir()) == []


def test_a_run_without_weights_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty_run").mkdir()
    err = export_fails([str(tmp_path / "empty_run"), "--format", "onnx", "--out", str(tmp_path / "o")], capsys)
    assert "empty_run/teacher.safetensors" in err and "not found" in err
    assert not (tmp_path / "o").exists()


def test_a_non_empty_out_needs_force(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    export_ok(run, "timm", out, capsys)
    (out / "stale.txt").write_text("left by the earlier export's user")
    err = export_fails([str(run), "--format", "timm", "--out", str(out)], capsys)
    assert str(out) in err and "--force" in err
    assert (out / "stale.txt").is_file()
    assert main(["export", str(run), "--format", "timm", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [export_module.MARKER, "config.json", "model.safetensors"]
    marker = json.loads((out / export_module.MARKER).read_text())
    assert marker["format"] == "timm" and marker["source"] == str(run.resolve())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it


def test_force_replaces_only_an_earlier_export(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = export_fails([str(run), "--format", "timm", "--out", str(out), "--force"], capsys)
    assert str(out) in err and export_module.MARKER in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("where", ["RUN", "RUN/..", ".", "RUN/sub", "RUN/teacher.safetensors"])
def test_out_is_never_the_run_folder_above_or_inside_it(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out RUN --force`` deleted the run folder; ``--out .`` / ``RUN/..`` ended in an OSError and debris."""
    run = make_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "sub").mkdir()
    (run / "sub" / "notes.txt").write_text("mine")
    before = _hashes(tmp_path)
    monkeypatch.chdir(tmp_path)  # "." is the run folder's parent, as in the issue
    out = where.replace("RUN", str(run))
    for weights in (run, run / "teacher.safetensors"):
        err = export_fails([str(weights), "--format", "onnx", "--out", out, "--force"], capsys)
        assert f"--out {out}:" in err and ("run folder" in err or "working directory" in err)
    assert _hashes(tmp_path) == before  # byte-identical, no .old-* or .export-* folder left anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_new_folder_beside_a_foreign_weights_file_is_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A downloaded weights file's folder holds no run: a new sub-folder there is just a new folder."""
    run = make_run(tmp_path / "run")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    weights = downloads / "vit.safetensors"
    shutil.copy(run / "teacher.safetensors", weights)
    assert main(["export", str(weights), "--format", "timm", "--out", str(downloads / "timm")]) == 0
    assert (downloads / "timm" / "model.safetensors").is_file()
    err = export_fails([str(weights), "--format", "timm", "--out", str(downloads), "--force"], capsys)
    assert "run folder" in err


@pytest.mark.parametrize("fmt", ["timm", "hf"])
@pytest.mark.parametrize("override", ["model.stem=conv", "model.mlp_dwconv=true"])
def test_what_a_format_cannot_express_is_refused(
    fmt: str, override: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "run", override)
    err = export_fails([str(run), "--format", fmt, "--out", str(tmp_path / "o")], capsys)
    assert err.startswith(f"ibot: error: {override}: --format {fmt} ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("fmt", "module"), [("hf", "transformers"), ("onnx", "onnxruntime")])
def test_a_missing_extra_is_named(
    fmt: str,
    module: str,
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    err = export_fails([str(run), "--format", fmt, "--out", str(tmp_path / "o")], capsys)
    assert err == f"ibot: error: ibot export --format {fmt} needs {module}: pip install 'ibot[{fmt}]'"


def test_onnx_takes_what_timm_and_hf_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "run", "model.stem=conv", "model.mlp_dwconv=true")
    # The TorchScript exporter alone: seconds, where torch.export takes ~10 s (the test above runs it).
    exporters = {"TorchScript": export_module.ONNX_EXPORTERS["TorchScript"]}
    monkeypatch.setattr(export_module, "ONNX_EXPORTERS", exporters)
    export_ok(run, "onnx", tmp_path / "onnx", capsys)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = images(EVAL_SIZE, batch=4)
    cls, patches = session.run(["cls", "patch_tokens"], {"images": batch.numpy()})
    theirs = torch.cat([torch.from_numpy(cls)[:, None], torch.from_numpy(patches)], dim=1)
    assert (theirs - ours(run, batch)).abs().max().item() <= 1e-4


def test_export_does_not_import_training() -> None:
    import ast

    tree = ast.parse(Path(export_module.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "ibot.eval.features" in names  # the walk sees the imports
    assert not any(name.startswith("ibot.train") for name in names)
