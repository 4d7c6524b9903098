"""Training pieces: augmentations move boxes with the pixels, truth boxes, crops, a one-step run + resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ctlesion_phantoms import splits
from damoyolo.augment import AugmentConfig, augment, hflip, rotate, vflip
from damoyolo.dataset import crop_boxes
from damoyolo.train import TrainConfig, lr_at


def _disk_image(cx: float, cy: float, r: float, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]  # pixel centres on integers (docs/contracts.md, "Coordinates")
    disk = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float32) * 200
    return np.stack([disk, disk, disk]), np.array([[cx - r, cy - r, cx + r, cy + r]], np.float32)


def _blob_box(image: np.ndarray) -> np.ndarray:
    """Bounding box (outer pixel edges, centres on integers) of the bright pixels of channel 0."""
    ys, xs = np.nonzero(image[0] > 100)
    return np.array([xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5], np.float32)


@pytest.mark.parametrize("flip", [hflip, vflip])
def test_flips_move_boxes_with_pixels(flip) -> None:  # noqa: ANN001
    img, box = _disk_image(30, 20, 8)
    out, b = flip(img, box)
    assert np.allclose(_blob_box(np.ascontiguousarray(out)), b[0], atol=1.0)


@pytest.mark.parametrize("degrees", [-15.0, 7.0, 15.0])
def test_rotation_moves_round_boxes_with_pixels(degrees: float) -> None:
    img, box = _disk_image(62, 30, 9)
    out, b = rotate(img, box, degrees)
    assert np.allclose(_blob_box(out), b[0], atol=1.5)
    # the box keeps the round object's size (the inscribed-ellipse rule), not the corner hull
    assert math.isclose(b[0, 2] - b[0, 0], 18, abs_tol=0.5)


def test_augment_keeps_boxes_on_the_object_over_many_draws() -> None:
    rng = np.random.default_rng(3)
    cfg = AugmentConfig(p_brightness_contrast=0.0, p_blur=0.0)  # photometric ones move nothing
    for _ in range(20):
        img, box = _disk_image(40, 55, 7)
        out, b = augment(img, box, rng, cfg)
        assert out.dtype == np.float32 and out.shape == img.shape
        assert np.allclose(_blob_box(out), b[0], atol=1.5)


def test_photometric_augmentations_stay_in_range() -> None:
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(p_hflip=0, p_vflip=0, p_rotate=0, p_brightness_contrast=1.0, p_blur=1.0)
    img, box = _disk_image(40, 40, 10)
    out, b = augment(img, box, rng, cfg)
    assert out.min() >= 0 and out.max() <= 255 and np.array_equal(b, box)
    # a 3 x 3 blur: the disk's centre keeps its value, the edge softens
    assert out[0, 40, 40] > 150 and not np.array_equal(out, img)


def test_crop_boxes_drop_mostly_outside() -> None:
    boxes = np.array([[10, 10, 20, 20], [60, 60, 80, 80], [95, 0, 105, 10]], np.float32)
    out = crop_boxes(boxes, 0, 0, 100, 0.6)
    assert out.tolist() == [[10, 10, 20, 20], [60, 60, 80, 80]]  # the third is half outside


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


@pytest.mark.slow
def test_one_step_training_resumes_and_releases(tmp_path: Path) -> None:
    import torch

    from ctlesion_export.cli import load_detector
    from damoyolo.train import train

    cfg = TrainConfig(train_cases=1, val_cases=1, data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"),
                      epochs=1, steps_per_epoch=1, batch_size=2, crop=96, val_slices_max=2, warmup_steps=1,
                      phantom_slices_max=16, threads=2)
    first = train(cfg, quiet=True)
    assert len(first["history"]) == 1 and math.isfinite(first["history"][0]["train"]["total"])
    cfg.epochs = 2
    release = tmp_path / "release.pt"
    second = train(cfg, quiet=True, release=release)
    assert [h["epoch"] for h in second["history"]] == [1, 2]  # resumed, not restarted
    model, meta = load_detector(release)
    assert meta["variant"] == cfg.variant and meta["in_channels"] == 3 and meta["window"] == "lung"
    state = torch.load(release, weights_only=True)["model"]
    assert any(v.dtype == torch.float16 for v in state.values())  # released as fp16
    scores, boxes = model(torch.zeros(1, 3, 64, 64))
    assert scores.shape[-1] == 1 and boxes.shape[-1] == 4


@pytest.mark.slow
def test_training_with_worker_processes_decodes_and_batches_the_same_data(tmp_path: Path) -> None:
    """--workers: series decoded in processes equal the serial decode; worker batches train a step."""
    from ctlesion_phantoms import PhantomConfig
    from damoyolo.dataset import ensure_cases, load_cases
    from damoyolo.train import train

    dirs = ensure_cases(tmp_path / "data" / "train", [splits.TRAIN_SEED, splits.TRAIN_SEED + 1],
                        PhantomConfig(slices_max=16))
    serial, parallel = load_cases(dirs), load_cases(dirs, workers=2)
    assert [c.case_id for c in parallel] == [c.case_id for c in serial]
    assert all(np.array_equal(a.windowed, b.windowed) for a, b in zip(serial, parallel, strict=True))

    cfg = TrainConfig(train_cases=2, val_cases=1, data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"),
                      epochs=1, steps_per_epoch=3, batch_size=2, crop=96, val_slices_max=2, warmup_steps=1,
                      phantom_slices_max=16, threads=2, workers=2)
    summary = train(cfg, quiet=True)
    assert summary["history"][0]["step"] == 3 and math.isfinite(summary["history"][0]["train"]["total"])
    assert (tmp_path / "run" / "best.pt").exists()


def test_hard_weight_draws_hard_nodules_that_much_more_often() -> None:
    """--hard-weight 4: a juxtapleural nodule's box is drawn 4x as often as an isolated 15 mm one's."""
    from types import SimpleNamespace

    from damoyolo.dataset import CaseData, CropSampler, is_hard

    hard = SimpleNamespace(attachment="juxtapleural", diameter_mm=6.0)
    easy = SimpleNamespace(attachment="isolated", diameter_mm=15.0)
    assert is_hard(hard) and not is_hard(easy)
    # slice k is filled with the value k, so a crop tells which slice it came from
    windowed = np.repeat(np.arange(4, dtype=np.uint8)[:, None, None], 128, 1).repeat(128, 2)
    box = np.array([[40, 40, 60, 60]], np.float32)
    case = CaseData("c", windowed, {1: box, 2: box}, np.arange(4), SimpleNamespace(nodules=[hard, easy]),
                    {1: [0], 2: [1]})

    def hard_fraction(weight: float) -> float:
        sampler = CropSampler([case], crop=64, k=1, p_positive=1.0, hard_weight=weight)
        rng = np.random.default_rng(0)
        drawn = [int(sampler.sample(rng)[0][0, 0, 0]) for _ in range(2000)]
        assert set(drawn) <= {1, 2}
        return drawn.count(1) / len(drawn)

    assert hard_fraction(4.0) == pytest.approx(0.8, abs=0.04)
    assert hard_fraction(1.0) == pytest.approx(0.5, abs=0.04)


def test_nodule_balance_draws_a_small_nodule_as_often_as_a_large_one() -> None:
    """--nodule-balance 1: a nodule on 1 slice and one on 3 slices are drawn equally often (by nodule,
    not by slice); 0 draws by box, so the 3-slice nodule comes 3x as often."""
    from types import SimpleNamespace

    from damoyolo.dataset import CaseData, CropSampler

    small = SimpleNamespace(attachment="isolated", diameter_mm=4.0)
    large = SimpleNamespace(attachment="isolated", diameter_mm=20.0)
    windowed = np.repeat(np.arange(5, dtype=np.uint8)[:, None, None], 128, 1).repeat(128, 2)
    box = np.array([[40, 40, 60, 60]], np.float32)
    case = CaseData("c", windowed, {1: box, 2: box, 3: box, 4: box}, np.arange(5),
                    SimpleNamespace(nodules=[small, large]), {1: [0], 2: [1], 3: [1], 4: [1]})

    def small_fraction(balance: float) -> float:
        sampler = CropSampler([case], crop=64, k=1, p_positive=1.0, nodule_balance=balance)
        rng = np.random.default_rng(0)
        drawn = [int(sampler.sample(rng)[0][0, 0, 0]) for _ in range(2000)]
        return drawn.count(1) / len(drawn)

    assert small_fraction(1.0) == pytest.approx(0.5, abs=0.04)
    assert small_fraction(0.0) == pytest.approx(0.25, abs=0.04)


def test_generated_case_dirs_refuse_seeds_of_another_split(tmp_path: Path) -> None:
    """--val-dir takes validation seeds only and --train-dir training seeds only: a held-out case
    can never reach training or model selection by a mistyped folder."""
    import json

    from damoyolo.data.types import DataError
    from damoyolo.train import generated_case_dirs

    for name, seed in (("v", splits.VALIDATION_SEED), ("t", splits.TEST_SEED)):
        (tmp_path / name / "case").mkdir(parents=True)
        (tmp_path / name / "case" / "truth.json").write_text(json.dumps({"seed": seed}))
    assert generated_case_dirs([str(tmp_path / "v")], "validation") == [tmp_path / "v" / "case"]
    with pytest.raises(DataError, match="not in the train range"):
        generated_case_dirs([str(tmp_path / "v")])
    with pytest.raises(DataError, match="not in the validation range"):
        generated_case_dirs([str(tmp_path / "t")], "validation")


def test_pretrained_official_layout_through_the_train_command(tmp_path: Path) -> None:
    """A fake official checkpoint (the recorded key layout of DAMO-YOLO-T, 80 COCO classes, random
    tensors of the official shapes) loaded the way ``ctlesion train --pretrained`` loads it."""
    import json
    from importlib import resources

    import torch

    from damoyolo.train import TrainConfig, build_detector, build_parser, config_from_args

    keys = json.loads(resources.files("damoyolo").joinpath("official_keys.json").read_text())["variants"]["T"]["keys"]
    gen = torch.Generator().manual_seed(0)
    fake = {}
    for name, shape in keys.items():
        if name.endswith("num_batches_tracked"):
            fake[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            fake[name] = torch.rand(shape, generator=gen) + 0.5
        else:
            fake[name] = torch.randn(shape, generator=gen)
    path = tmp_path / "damoyolo_tinynasL20_T.pth"
    torch.save({"model": fake}, path)  # the released files hold {'model': state_dict}

    cfg = config_from_args(build_parser().parse_args(["--variant", "T", "--pretrained", str(path), "--lr", "1e-4"]))
    assert cfg.lr == 1e-4 and cfg.k == 3 and cfg.class_names == ["nodule"]
    model, report = build_detector(cfg)
    cls_keys = [f"head.gfl_cls.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert sorted(report.skipped) == sorted(cls_keys) and not report.missing and not report.unexpected
    assert len(report.loaded) == len(keys) - 6
    sd = model.state_dict()
    for name in ("backbone.block_list.0.conv.conv.weight", "neck.bu_conv13.conv.weight", "head.gfl_reg.0.weight"):
        assert torch.equal(sd[name], fake[name]), name  # RGB stem kept for the 3 slices of 2.5D input
    assert tuple(sd["head.gfl_cls.0.weight"].shape) == (1, 64, 3, 3)
    assert torch.allclose(sd["head.gfl_cls.0.bias"], torch.full((1,), -math.log(99.0)))  # prior 0.01
    model.eval()
    scores, boxes = model(torch.zeros(1, 3, 64, 64))
    assert scores.shape[-1] == 1 and boxes.shape[-1] == 4

    # 5-slice input: the stem no longer fits and is re-initialised too, reported, never silent
    _, report5 = build_detector(TrainConfig(variant="T", pretrained=str(path), k=5))
    assert "backbone.block_list.0.conv.conv.weight" in report5.skipped


def test_folds_of_the_luna16_protocol() -> None:
    from damoyolo.data import DataError
    from damoyolo.train import TrainConfig, resolve_folds

    assert resolve_folds(TrainConfig(data="luna16:x", test_fold=0)) == (set(range(2, 10)), {1})
    assert resolve_folds(TrainConfig(data="luna16:x", test_fold=9)) == (set(range(1, 9)), {0})
    assert resolve_folds(TrainConfig(data="luna16:x", folds="0-7", val_folds="8")) == (set(range(8)), {8})
    assert resolve_folds(TrainConfig(data="luna16:x", folds="0-5", val_folds="5", test_fold=0)) == ({1, 2, 3, 4}, {5})
    with pytest.raises(DataError, match="val-folds"):
        resolve_folds(TrainConfig(data="luna16:x"))
