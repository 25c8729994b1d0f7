"""1- and 5-channel backbones after training: export, embed, eval, retrieve, visualize and init_from.

The folders are 5-channel uint16 TIFFs and 1-channel 16-bit PNGs (12-bit values) in two class
folders; the run folders hold seeded, untrained pico backbones saved as a run saves its teacher.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from test_method import make_batch
from timm.models import adapt_input_conv

from ibot.cli import main
from ibot.config import Config, load_config
from ibot.data.display import drawn_channels
from ibot.data.transforms import build_eval_transform
from ibot.errors import ConfigError, IBOTError
from ibot.eval.embed import EmbedRequest, read_sidecar, run_embed
from ibot.eval.features import encode, extract_features, load_frozen
from ibot.method import IBOT
from ibot.models.init_weights import read_init_weights
from ibot.models.vit import MaskedViT
from ibot.run_folder import RunFolder
from ibot.runtime import Runtime
from ibot.storage import TEACHER_NAME, save_backbone
from ibot.visualize import to_pixels

from conftest import tiny_overrides

SIDE = 20  # stored images: resized to the 16 px evaluation view
PER_CLASS = 6
DIM = 48  # vit_pico
CHANNEL_KEYS = {
    5: ["data.channels=5", "data.mean=[0.3,0.4,0.5,0.6,0.7]", "data.std=[0.2,0.25,0.3,0.2,0.25]"],
    1: ["data.channels=1", "data.mean=[0.5]", "data.std=[0.25]", "data.intensity=minmax"],
}
PROBE = ["eval.probe_lrs=[0.1]", "eval.probe_epochs=2", "eval.probe_max_extensions=0"]


def make_tiffs(root: Path) -> Path:
    """Two classes of 5-channel uint16 TIFFs, each class around its own level per channel."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class_{c}").mkdir(parents=True)
        level = rng.integers(5000, 60000, size=5)
        for i in range(PER_CLASS):
            image = np.clip(level + rng.integers(-4000, 4000, size=(SIDE, SIDE, 5)), 0, 65535).astype(np.uint16)
            tifffile.imwrite(
                root / f"class_{c}" / f"{i:03d}.tif", image, photometric="minisblack", planarconfig="contig"
            )
    return root


def make_pngs16(root: Path) -> Path:
    """Two classes of 1-channel 16-bit PNGs holding 12-bit values (a bright square vs. a ramp)."""
    rng = np.random.default_rng(1)
    for c in range(2):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            image = rng.integers(0, 800, size=(SIDE, SIDE))
            if c == 0:
                image[5:15, 5:15] += 3000
            else:
                image += np.arange(SIDE)[None, :] * 150
            Image.fromarray(np.clip(image, 0, 4095).astype(np.uint16)).save(root / f"class_{c}" / f"{i:03d}.png")
    return root


def run_config(data: Path, out: Path, channels: int, *extra: str) -> Config:
    return load_config(None, [*tiny_overrides(data, out), *CHANNEL_KEYS[channels], *extra])


def make_run(folder: Path, cfg: Config) -> Path:
    """A run folder whose teacher backbone (every weight random, norms and biases too) has ``data.channels`` inputs."""
    torch.manual_seed(0)
    backbone = MaskedViT.from_config(cfg.model, cfg.data.global_crop_size, cfg.data.channels)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_backbone(folder / TEACHER_NAME, backbone.state_dict(), cfg.to_dict())
    return folder


@pytest.fixture(scope="module")
def tiffs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiffs(tmp_path_factory.mktemp("tiff5"))


@pytest.fixture(scope="module")
def pngs16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pngs16(tmp_path_factory.mktemp("png1"))


@pytest.fixture(scope="module")
def runs(tiffs: Path, pngs16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, Path]]:
    """channels -> (run folder, its image folder)."""
    base = tmp_path_factory.mktemp("runs")
    return {
        5: (make_run(base / "run5", run_config(tiffs, base / "out5", 5)), tiffs),
        1: (make_run(base / "run1", run_config(pngs16, base / "out1", 1)), pngs16),
    }


def unit_values(path: Path, channels: int) -> np.ndarray:
    """(H, W, C) in [0, 1] as the run's data.intensity maps the file: 5 channels / 65535 (dtype);
    1 channel stretched between its own extremes (minmax)."""
    if channels == 5:
        return tifffile.imread(path).astype(np.float32) / 65535
    values = np.asarray(Image.open(path), dtype=np.float32)[..., None]
    return (values - values.min()) / (values.max() - values.min())


def eval_views(folder: Path, cfg: Config) -> torch.Tensor:
    """The evaluation views computed here without the package's transform: bicubic (antialiased)
    20 -> 16 px, clamped to [0, 1], normalised by the run's C means and stds."""
    suffix = "*.tif" if cfg.data.channels == 5 else "*.png"
    arrays = [unit_values(p, cfg.data.channels) for p in sorted(folder.glob(f"class_*/{suffix}"))]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (cfg.data.mean, cfg.data.std))
    return (x - mean) / std


# --- the model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["patch", "conv"])
@pytest.mark.parametrize("channels", [1, 5])
def test_the_method_takes_the_data_channels(tmp_path: Path, stem: str, channels: int) -> None:
    cfg = run_config(tmp_path, tmp_path / "out", channels, f"model.stem={stem}")
    method = IBOT(cfg.model, cfg.loss, 16, cfg.mim, cfg.data.channels)
    assert method.student["backbone"].in_chans == channels
    batch = make_batch()
    batch = replace(
        batch,
        global_crops=batch.global_crops[:, :1].repeat(1, channels, 1, 1),
        local_crops=batch.local_crops[:, :1].repeat(1, channels, 1, 1),
    )
    assert torch.isfinite(method(batch, teacher_temp=0.04).total)
    with pytest.raises(RuntimeError):  # an RGB batch no longer fits
        method(make_batch(), teacher_temp=0.04)


# --- eval transform ---------------------------------------------------------------------------------


def test_eval_transform_of_arrays_resizes_crops_and_normalises_every_channel() -> None:
    rng = np.random.default_rng(0)
    array = rng.random((20, 30, 5), dtype=np.float32)
    mean, std = (0.1, 0.2, 0.3, 0.4, 0.5), (0.5, 0.4, 0.3, 0.2, 0.1)
    view = build_eval_transform(16, 0.8, mean, std)(array)  # short side 20 -> 20, centre 16 x 16
    x = torch.from_numpy(array).permute(2, 0, 1)[:, 2:18, 7:23]
    assert view.shape == (5, 16, 16)
    torch.testing.assert_close(view, (x - torch.tensor(mean).view(5, 1, 1)) / torch.tensor(std).view(5, 1, 1))


def test_eval_transform_of_an_rgb_image_keeps_the_pil_path() -> None:
    from torchvision import transforms as T

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    bicubic = T.InterpolationMode.BICUBIC
    today = T.Compose([T.Resize(18, interpolation=bicubic), T.CenterCrop(16), T.ToTensor(), T.Normalize(mean, std)])
    assert torch.equal(build_eval_transform(16, 0.875, mean, std)(image), today(image))


# --- export ----------------------------------------------------------------------------------------------


def _ours(run: Path, images: torch.Tensor) -> torch.Tensor:
    backbone = load_frozen(str(run), on_cpu=True).backbone
    with torch.no_grad():
        out = backbone(images)
    return torch.cat([out.cls[:, None], out.patches], dim=1)


@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("fmt", ["timm", "hf", "onnx"])
def test_export_round_trip(
    runs: dict[int, tuple[Path, Path]], tmp_path: Path, fmt: str, channels: int, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = runs[channels]
    out = tmp_path / fmt
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    images = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(5))
    ours = _ours(run, images)
    if fmt == "timm":
        import timm

        config = json.loads((out / "config.json").read_text())
        assert config["model_args"]["in_chans"] == channels
        assert config["pretrained_cfg"]["input_size"][0] == channels
        assert len(config["pretrained_cfg"]["mean"]) == len(config["pretrained_cfg"]["std"]) == channels
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        with torch.no_grad():
            theirs = model.forward_features(images)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    elif fmt == "hf":
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(out, add_pooling_layer=False).eval()
        assert model.config.num_channels == channels
        assert len(AutoImageProcessor.from_pretrained(out).image_mean) == channels
        with torch.no_grad():
            theirs = model(pixel_values=images).last_hidden_state
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[1:] == [channels, 16, 16]
        cls, patches = session.run(["cls", "patch_tokens"], {"images": images.numpy()})
        theirs = torch.cat([torch.from_numpy(cls)[:, None], torch.from_numpy(patches)], dim=1)
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


# --- embed -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 5])
def test_embed_cls_and_patch_rows_are_the_backbone_on_the_full_precision_views(
    runs: dict[int, tuple[Path, Path]], tmp_path: Path, channels: int
) -> None:
    run, folder = runs[channels]
    frozen = load_frozen(str(run), on_cpu=True)
    backbone, cfg = frozen.backbone, frozen.cfg
    expected = encode(backbone, eval_views(folder, cfg), Runtime.resolve(cfg.train), patch_dtype=torch.float32)
    options = {"num_workers": 0, "progress": False, "batch_size": 5}
    run_embed(EmbedRequest(str(run), str(folder), str(tmp_path / "cls.npy"), pool="cls", **options))
    run_embed(EmbedRequest(str(run), str(folder), str(tmp_path / "patch.npy"), pool="patch", **options))
    cls = np.load(tmp_path / "cls.npy")
    patch = np.load(tmp_path / "patch.npy", mmap_mode="r")
    assert cls.shape == (2 * PER_CLASS, DIM) and cls.dtype == np.float32
    assert patch.shape == (2 * PER_CLASS, 4, 4, DIM) and patch.dtype == np.float16
    assert np.isfinite(cls).all() and np.isfinite(patch).all()
    np.testing.assert_allclose(cls, expected.cls[:, -1].numpy(), atol=1e-5)
    grid = expected.patches.reshape(-1, 4, 4, DIM).numpy()  # type: ignore[union-attr]
    np.testing.assert_allclose(patch.astype(np.float32), grid, atol=5e-3, rtol=5e-3)
    assert [row[1] for row in read_sidecar(tmp_path / "patch.npy.paths.tsv")] == ["class_0"] * 6 + ["class_1"] * 6


# --- eval -------------------------------------------------------------------------------------------------


def _eval(command: str, run: Path, folder: Path, out: Path, *extra: str) -> dict:
    argv = ["eval", command, str(run), "--train-dir", str(folder), "--test-dir", str(folder)]
    assert main([*argv, "--no-progress", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("channels", [1, 5])
def test_eval_knn_and_dense_give_numbers(runs: dict[int, tuple[Path, Path]], tmp_path: Path, channels: int) -> None:
    run, folder = runs[channels]
    knn = _eval("knn", run, folder, tmp_path / "knn.json", "eval.knn_k=[5]")
    assert knn["train_images"] == knn["test_images"] == 2 * PER_CLASS
    top1 = knn["knn"]["5"]["top1"]
    assert 0 <= top1 <= 100
    mosaics = ["eval.dense_train_mosaics=6", "eval.dense_test_mosaics=3", *PROBE]
    dense = _eval("dense", run, folder, tmp_path / "dense.json", *mosaics)
    assert {d["features"] for d in dense["dense"]} == {"patch tokens", "[cls] broadcast"}
    assert all(0 <= d["test_miou"] <= 100 for d in dense["dense"])


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("retrieval", []),
        ("cluster", ["eval.cluster_restarts=1"]),
        ("lowshot", ["eval.lowshot_shots=[1]", "eval.lowshot_fractions=[]", "eval.lowshot_draws=[0]"]),
        ("probe", ["eval.probes=[cls,attention-pool]", *PROBE]),
    ],
)
def test_the_other_eval_commands_run_on_five_channels(
    runs: dict[int, tuple[Path, Path]], tmp_path: Path, command: str, extra: list[str]
) -> None:
    run, folder = runs[5]
    result = _eval(command, run, folder, tmp_path / f"{command}.json", *extra)
    numbers = [v for v in _leaves(result) if isinstance(v, float)]
    assert numbers and all(np.isfinite(numbers))
    if command == "probe":  # its attention-pool picture draws the first 3 of the 5 channels
        picture = RunFolder(run).attention_pool(random_init=False)
        with Image.open(picture) as image:
            assert image.size[0] > 0


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


@pytest.mark.parametrize("channels", [1, 5])
def test_eval_finetune_runs_on_any_channels(runs: dict[int, tuple[Path, Path]], tmp_path: Path, channels: int) -> None:
    run, folder = runs[channels]
    settings = ["finetune.epochs=1", "finetune.batch_size=4", "finetune.num_workers=0", "finetune.warmup_epochs=0"]
    result = _eval("finetune", run, folder, tmp_path / "ft.json", *settings)
    assert result["steps"] == 3 and 0 <= result["test_top1"] <= 100 and np.isfinite(result["train_loss"])


def test_eval_robustness_refuses_other_than_rgb_in_one_line(
    runs: dict[int, tuple[Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    run, folder = runs[5]
    before = sorted(run.rglob("*"))
    argv = ["eval", "robustness", str(run), "--train-dir", str(folder), "--test-dir", str(folder), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibot: error: ") and "\n" not in err and "data.channels=5" in err
    assert sorted(run.rglob("*")) == before  # refused before any feature was extracted or written


def test_feature_cache_keys_the_intensity_mapping(runs: dict[int, tuple[Path, Path]], tmp_path: Path) -> None:
    run, folder = runs[1]
    frozen = load_frozen(str(run))
    first = extract_features(frozen.backbone, str(folder), frozen.cfg, frozen.runtime, 0, False, cache_dir=tmp_path)
    window = replace(frozen.cfg, data=replace(frozen.cfg.data, intensity="window", intensity_window=(0.0, 4095.0)))
    other = extract_features(frozen.backbone, str(folder), window, frozen.runtime, 0, False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.allclose(first.cls, other.cls)


# --- retrieve and visualize -------------------------------------------------------------------------


def test_retrieve_reads_tiff_queries_and_draws_their_thumbnails(
    runs: dict[int, tuple[Path, Path]], tmp_path: Path
) -> None:
    run, folder = runs[5]
    query = folder / "class_1" / "002.tif"
    argv = ["retrieve", str(run), "--index", str(folder), "--query", str(query), "--k", "2"]
    assert main([*argv, "--out", str(tmp_path / "sheet"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "sheet" / "retrieval.json").read_text())
    assert result["queries"][0]["results"][0]["path"] == "class_1/002.tif"  # itself, the nearest
    page = (tmp_path / "sheet" / "retrieval.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 3 and "unreadable" not in page


def test_to_pixels_draws_the_picked_channels() -> None:
    images = torch.rand(2, 5, 4, 4)
    mean, std = (0.0,) * 5, (1.0,) * 5
    torch.testing.assert_close(to_pixels(images, mean, std, (4, 2, 0)), images[:, [4, 2, 0]].permute(0, 2, 3, 1))
    grey = to_pixels(images, mean, std, (3,))
    assert (
        grey.shape == (2, 4, 4, 3)
        and torch.equal(grey[..., 0], images[:, 3])
        and torch.equal(grey[..., 2], images[:, 3])
    )
    assert torch.equal(to_pixels(images[:, :1], mean[:1], std[:1])[..., 1], images[:, 0])  # 1 channel: grey


@pytest.mark.parametrize(
    ("spec", "channels", "picked"), [("", 5, (0, 1, 2)), ("", 1, (0,)), ("4,0,2", 5, (4, 0, 2)), ("3", 5, (3,))]
)
def test_drawn_channels(spec: str, channels: int, picked: tuple[int, ...]) -> None:
    assert drawn_channels(spec, channels) == picked


@pytest.mark.parametrize(("spec", "channels"), [("5", 5), ("0,1", 5), ("a,b,c", 5), ("1", 1), ("0,-1,2", 5)])
def test_wrong_channels_are_one_line(spec: str, channels: int) -> None:
    with pytest.raises(IBOTError, match=r"^--channels "):
        drawn_channels(spec, channels)


@pytest.mark.parametrize("channels", [1, 5])
def test_visualize_writes_pictures_of_the_picked_channels(
    runs: dict[int, tuple[Path, Path]], tmp_path: Path, channels: int, capsys: pytest.CaptureFixture[str]
) -> None:
    run, folder = runs[channels]
    base = ["--images", str(folder), "--count", "2"]
    picks = [["--channels", "4,2,0"], ["--channels", "3"], []] if channels == 5 else [[], ["--channels", "0"]]
    for n, extra in enumerate(picks):
        out = tmp_path / f"pca-{n}.png"
        assert main(["visualize", "pca", str(run), *base, "--output", str(out), *extra]) == 0
        with Image.open(out) as picture:
            assert picture.size[0] > 0
    out = tmp_path / "attention.png"
    assert main(["visualize", "attention", str(run), *base, "--output", str(out), "--channels", "0"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert (
        main(["visualize", "pca", str(run), *base, "--channels", str(channels), "--output", str(tmp_path / "x.png")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibot: error: --channels ") and "\n" not in err
    assert not (tmp_path / "x.png").exists()


# --- init_from: an RGB backbone into 1 and 5 channels -------------------------------------------------


@pytest.mark.parametrize("stem", ["patch", "conv"])
@pytest.mark.parametrize("channels", [1, 5])
def test_init_from_adapts_an_rgb_backbone_as_timm_does(tmp_path: Path, channels: int, stem: str) -> None:
    rgb = load_config(None, [*tiny_overrides(tmp_path, tmp_path / "o"), f"model.stem={stem}"])
    rgb_run = make_run(tmp_path / "rgb", rgb)
    rgb_backbone = load_frozen(str(rgb_run), on_cpu=True).backbone
    cfg = run_config(tmp_path, tmp_path / "o", channels, f"model.stem={stem}")
    init = read_init_weights(rgb_run, cfg.model, 16, cfg.data.channels)
    key = "vit.patch_embed.backbone.0.weight" if stem == "conv" else "vit.patch_embed.proj.weight"
    rgb_weights = rgb_backbone.state_dict()
    want = adapt_input_conv(channels, rgb_weights[key].clone())
    for branch in (init.student, init.teacher):
        assert branch[f"backbone.{key}"].shape[1] == channels
        assert torch.equal(branch[f"backbone.{key}"], want)
        others = [k for k in rgb_weights if k != key and k != "mask_token"]
        assert all(torch.equal(branch[f"backbone.{k}"], rgb_weights[k]) for k in others)
    what = "conv stem's first convolution" if stem == "conv" else "patch embedding"
    assert f"{what} adapted from 3 to {channels} input channels" in init.summary()
    method = IBOT(cfg.model, cfg.loss, 16, cfg.mim, cfg.data.channels)
    init.load_into(method.student, method.teacher)
    assert torch.equal(method.teacher["backbone"].state_dict()[key], want)


def test_init_from_sums_rgb_so_a_grey_image_keeps_its_tokens(tmp_path: Path) -> None:
    rgb = load_config(None, tiny_overrides(tmp_path, tmp_path / "o"))
    rgb_backbone = load_frozen(str(make_run(tmp_path / "rgb", rgb)), on_cpu=True).backbone
    cfg = run_config(tmp_path, tmp_path / "o", 1)
    init = read_init_weights(tmp_path / "rgb", cfg.model, 16, 1)
    grey_backbone = MaskedViT.from_config(cfg.model, 16, 1).eval()
    grey_backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in init.teacher.items()})
    grey = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(grey_backbone(grey).cls, rgb_backbone(grey.expand(-1, 3, -1, -1)).cls)


def test_init_from_refuses_a_non_rgb_backbone_into_other_channels(tmp_path: Path) -> None:
    five = run_config(tmp_path, tmp_path / "o", 5)
    make_run(tmp_path / "five", five)
    rgb = load_config(None, tiny_overrides(tmp_path, tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"a backbone of 5 input channels; the config has data.channels=3"):
        read_init_weights(tmp_path / "five", rgb.model, 16, rgb.data.channels)


# --- a bare weights file -----------------------------------------------------------------------------


def test_a_bare_five_channel_vit_file_needs_its_mean_and_std(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = MaskedViT("vit_pico", 4, 16, in_chans=5).vit
    path = tmp_path / "vit5.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match=r"5-channel backbone whose data.mean / data.std are unknown"):
        load_frozen(str(path), on_cpu=True)
    stats = ("data.mean=[0.5,0.5,0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2,0.2,0.2]")
    frozen = load_frozen(str(path), stats)
    assert frozen.backbone.in_chans == 5 and frozen.cfg.data.channels == 5
    assert torch.equal(frozen.backbone.vit.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    with pytest.raises(ConfigError, match=r"data.mean / data.std=auto is measured by ibot pretrain only"):
        load_frozen(str(path), ("data.mean=auto", "data.std=[0.2,0.2,0.2,0.2,0.2]"))
