"""Train DAMO-YOLO on phantom CT series, or on real data with ``--data luna16:DIR`` (``lidc:``,
``dicomcsv:``) by fold: ``ctlesion train`` (CPU or CUDA, resumable, tqdm).

Recipe (the article's, plus what detection training needs): AdamW (weight decay 1e-4), linear
warm-up then cosine decay, EMA of the weights (what is saved and served), the article's
augmentations (damoyolo.augment), random full-resolution crops so that a 2-core CPU can afford it,
2.5D lung-window input made by the serving code (damoyolo.dataset). An "epoch" is a fixed number
of steps of random crops; after each one the EMA model is validated on whole 512 x 512 slices of
held-out validation cases (slice mAP@0.5, recall and false positives per slice at the serving
threshold) and the best one is kept.

Checkpoints: ``OUT/last.pt`` (everything needed to resume), ``OUT/best.pt`` (release format
``{"model", "meta"}``, see docs/contracts.md); ``--release PATH`` also writes the best as fp16
(half the bytes; loading casts back to float32).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import damoyolo
from ctlesion_phantoms import PhantomConfig, splits
from damoyolo.augment import AugmentConfig, augment
from damoyolo.data.types import DataError
from damoyolo.dataset import CaseData, CropSampler, ensure_cases, load_cases
from preprocess_backend.postprocess import pairwise_iou, threshold_nms
from preprocess_backend.types import Options, mm_or_none


@dataclass
class TrainConfig:
    variant: str = damoyolo.CPU_DEFAULT
    train_cases: int = 40
    val_cases: int = 4
    train_seed: int = splits.TRAIN_SEED
    val_seed: int = splits.VALIDATION_SEED
    data_dir: str = "work/phantoms"
    out_dir: str = "work/train"
    crop: int = 256
    batch_size: int = 8
    epochs: int = 10
    steps_per_epoch: int = 200
    lr: float = 1e-4  # the article's (fine-tuning from COCO weights); from scratch needs more
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine ends at lr * this
    ema_decay: float = 0.9995
    ema_tau: float = 200.0  # EMA warm-up: decay ramps up over about this many steps
    grad_clip: float = 10.0
    p_positive: float = 0.6
    hard_weight: float = 1.0  # juxtapleural / juxtavascular / < 8 mm nodules drawn this much more often
    nodule_balance: float = 0.0  # box weights x (boxes of the nodule) ** -this: 1 = every nodule equally often
    window: str = "lung"
    k: int = 3
    model_size: int = 512
    val_slices_max: int = 96
    phantom_slices_max: int | None = None  # smaller phantoms (tests); None = the generator's default
    # more training cases: folders of generated cases (e.g. ``ctlesion phantom --profile wide``), each
    # case a subfolder with truth.json; they must come from training seeds (never validation / test)
    train_dirs: list[str] = field(default_factory=list)
    # more validation cases for model selection (e.g. ``--profile wide`` from validation seeds), so the
    # kept epoch is the best on the data the release is meant for, not on the 4 ``default`` series alone
    val_dirs: list[str] = field(default_factory=list)
    # physical scale (preprocess_backend Options): the slices resampled to this pixel size, the 2.5D
    # channels planes at this offset in mm; None: native pixels / neighbouring slices. Recorded in
    # the released checkpoint's meta, so serving can check it runs the model at its training scale.
    pixel_mm: float | None = field(default_factory=lambda: Options().pixel_mm)
    context_mm: float | None = field(default_factory=lambda: Options().context_mm)
    seed: int = 0
    pretrained: str | None = None  # an official DAMO-YOLO checkpoint to start from
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = all cores
    workers: int = 0  # processes making batches (and decoding series); 0 = in the training loop
    class_names: list[str] = field(default_factory=lambda: ["nodule"])
    # real data instead of phantoms (damoyolo.data): "luna16:DIR", "lidc:DIR" or "dicomcsv:DIR"
    data: str | None = None
    folds: str | None = None  # training folds ("0-7", "0,2,5"); default: all but the validation and test folds
    val_folds: str | None = None  # validation folds; default with test_fold: the fold after it
    test_fold: int | None = None  # held out for ``ctlesion evaluate --fold`` (LUNA16: 10-fold CV by subset)
    cache_dir: str = "work/cache"  # DICOM written from MetaImage volumes, windowed slices (.npy)
    min_readers: int = 3  # LIDC: readers (of 4) that must agree on a >= 3 mm nodule


class ModelEMA:
    """Exponential moving average of the weights (buffers copied), with a warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float, tau: float, updates: int = 0) -> None:
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(msd[name].detach(), alpha=1 - d)
            else:
                value.copy_(msd[name])


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_batch(
    sampler: CropSampler, rng: np.random.Generator, batch_size: int, aug: AugmentConfig | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    images, targets = [], []
    for _ in range(batch_size):
        image, boxes = sampler.sample(rng)
        if aug is not None:
            image, boxes = augment(image, boxes, rng, aug)
        images.append(np.asarray(image, dtype=np.float32))
        targets.append(torch.from_numpy(np.concatenate([np.zeros((len(boxes), 1), np.float32), boxes], 1)))
    return torch.from_numpy(np.stack(images)), targets


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless random batches made in DataLoader worker processes, each with its own seeded RNG.

    On a GPU the single-threaded crop + augment step, not the model, bounds the step rate; workers
    hide it. The cases are shared with the workers by fork (copy-on-write), not pickled.
    """

    def __init__(self, sampler: CropSampler, batch_size: int, aug: AugmentConfig, seed: int, step: int) -> None:
        self.sampler, self.batch_size, self.aug, self.seed, self.step = sampler, batch_size, aug, seed, step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        info = torch.utils.data.get_worker_info()
        # seeded by run seed, resume step and worker: reproducible per run, different after a resume
        rng = np.random.default_rng([self.seed, self.step, info.id if info else 0])
        while True:
            yield make_batch(self.sampler, rng, self.batch_size, self.aug)


def batch_source(
    sampler: CropSampler, rng: np.random.Generator, cfg: TrainConfig, aug: AugmentConfig, step: int
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Training batches: made in the loop (workers = 0, resumes bit-exactly) or by worker processes."""
    if cfg.workers <= 0:
        while True:
            yield make_batch(sampler, rng, cfg.batch_size, aug)
    loader = torch.utils.data.DataLoader(
        _BatchStream(sampler, cfg.batch_size, aug, cfg.seed, step),
        batch_size=None,  # items are whole batches already
        num_workers=cfg.workers,
        prefetch_factor=4,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context="fork",
    )
    yield from loader


@dataclass
class ValSet:
    """Whole slices of the validation cases: all slices with a nodule plus as many lung-only slices."""

    images: np.ndarray  # uint8 [N, k, H, W]
    boxes: list[np.ndarray]

    @classmethod
    def build(cls, cases: Sequence[CaseData], k: int, max_slices: int, seed: int, size: int = 512) -> ValSet:
        rng = np.random.default_rng(seed)
        picks: list[tuple[int, int]] = []
        for ci, case in enumerate(cases):
            picks += [(ci, s) for s in case.boxes]
        pos = len(picks)
        for ci, case in enumerate(cases):
            lung = case.lung_slices if len(case.lung_slices) else range(len(case.windowed))
            neg = [int(s) for s in lung if int(s) not in case.boxes]
            take = min(len(neg), max(1, pos // max(1, len(cases))))
            picks += [(ci, s) for s in rng.choice(neg, take, replace=False)] if neg else []
        if len(picks) > max_slices:
            picks = [picks[i] for i in sorted(rng.choice(len(picks), max_slices, replace=False))]
        images, boxes = [], []
        for ci, s in picks:
            case = cases[ci]
            # whole slices as the server sends them (physical scale: centred at the model's size)
            image, b = case.served(case.stack(k, s), case.boxes.get(s, np.zeros((0, 4), np.float32)), size)
            images.append(image)
            boxes.append(b[(b[:, 2] > 0) & (b[:, 0] < size) & (b[:, 3] > 0) & (b[:, 1] < size)])
        return cls(np.stack(images), boxes)


@torch.no_grad()
def validate(model: torch.nn.Module, val: ValSet, device: torch.device, batch: int = 8) -> dict[str, float]:
    """Slice mAP@0.5 (pycocotools) at score >= 0.05, and recall / FP per slice at the serving 0.3."""
    model.eval()
    preds = []
    for i in range(0, len(val.images), batch):
        x = torch.from_numpy(val.images[i : i + batch].astype(np.float32)).to(device)
        scores, boxes = model(x)
        for s, b in zip(scores.cpu().numpy(), boxes.cpu().numpy(), strict=True):
            preds.append(threshold_nms(s, b, score_threshold=0.05, iou_threshold=0.2))
    from damoyolo.eval.slice_map import slice_map  # lazy: pycocotools is only needed once validation runs

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its whole summary table
        metrics = slice_map(preds, [(g, np.zeros(len(g), np.int64)) for g in val.boxes])
    hits = total = fps = 0
    for (pb, ps, _), gt in zip(preds, val.boxes, strict=True):
        pb = pb[ps >= 0.3]
        total += len(gt)
        if len(pb) == 0:
            continue
        if len(gt) == 0:
            fps += len(pb)
            continue
        iou = pairwise_iou(pb, gt)
        hits += int((iou.max(0) >= 0.3).sum())
        fps += int((iou.max(1) < 0.3).sum())
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    out.update(recall_at_0_3=hits / max(total, 1), fp_per_slice_at_0_3=fps / len(val.images))
    return out


def release_state(model: torch.nn.Module, cfg: TrainConfig, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    sd = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    meta = {
        "variant": cfg.variant,
        "num_classes": len(cfg.class_names),
        "in_channels": cfg.k,
        "model_size": cfg.model_size,
        "class_names": cfg.class_names,
        "window": cfg.window,
        "k": cfg.k,
        "pixel_mm": cfg.pixel_mm,
        "context_mm": cfg.context_mm,
        "epoch": epoch,
        "metrics": metrics,
        "train_config": asdict(cfg),
    }
    return {"model": sd, "meta": meta}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _plain(value: object) -> object:
    """JSON for what json does not know: numpy scalars as numbers, paths and the rest as text."""
    return value.item() if isinstance(value, np.generic) else str(value)


def build_detector(cfg: TrainConfig) -> tuple[torch.nn.Module, damoyolo.LoadReport | None]:
    """The model to train: ``cfg.variant`` with ``len(cfg.class_names)`` classes and ``cfg.k`` input
    channels, started from ``cfg.pretrained`` (an official DAMO-YOLO checkpoint) when given.

    Loading keeps every tensor whose name and shape match (backbone, neck, the head's box branch),
    re-initialises the 80-class ``head.gfl_cls`` convolutions for our class count, and keeps the
    RGB stem for k = 3 (the three 2.5D slices take the place of R, G, B); see docs/training.md.
    """
    model = damoyolo.build_model(cfg.variant, num_classes=len(cfg.class_names), in_channels=cfg.k)
    if not cfg.pretrained:
        return model, None
    # weights_only: an official .pth is a pickle; tensors and containers only, no code runs on load
    return model, damoyolo.load_pretrained(model, torch.load(cfg.pretrained, map_location="cpu", weights_only=True))


def resolve_folds(cfg: TrainConfig, folds_total: int = 10) -> tuple[set[int], set[int]]:
    """(training folds, validation folds); the test fold is in neither."""
    from damoyolo.data import parse_folds

    held = set() if cfg.test_fold is None else {cfg.test_fold}
    val = parse_folds(cfg.val_folds)
    if val is None:
        if cfg.test_fold is None:
            raise DataError("--data needs --val-folds (or --test-fold K: validation is then fold K+1)")
        val = {(cfg.test_fold + 1) % folds_total}
    train_folds = parse_folds(cfg.folds)
    train_folds = set(range(folds_total)) if train_folds is None else train_folds
    train_folds = train_folds - val - held
    if not train_folds:
        raise DataError("no training fold left after the validation and test folds")
    return train_folds, val


def load_data_cases(cfg: TrainConfig) -> tuple[list[CaseData], list[CaseData]]:
    """Training and validation cases of ``cfg.data`` by fold, through the serving preprocessing."""
    from damoyolo.data import open_source
    from damoyolo.dataset import load_source_case

    source = open_source(str(cfg.data), Path(cfg.cache_dir) / "dicom", cfg.min_readers)
    train_folds, val_folds = resolve_folds(cfg)
    windowed = Path(cfg.cache_dir) / "windowed"
    picked = list(source.cases(train_folds | val_folds))
    loaded = [load_source_case(c, windowed, cfg.window, cfg.pixel_mm, cfg.context_mm) for c in tqdm(picked, desc=f"read {source.name}", unit="case")]
    train_cases = [d for c, d in zip(picked, loaded, strict=True) if c.fold in train_folds]
    val_cases = [d for c, d in zip(picked, loaded, strict=True) if c.fold in val_folds]
    if not train_cases or not val_cases:
        raise DataError(f"{cfg.data}: {len(train_cases)} training cases (folds {sorted(train_folds)}), "
                         f"{len(val_cases)} validation cases (folds {sorted(val_folds)}): need both")
    return train_cases, val_cases


def generated_case_dirs(folders: Sequence[str], split: str = "train") -> list[Path]:
    """Case folders (subfolders with truth.json) under each of ``folders``; only seeds of ``split``'s range."""
    out = []
    for folder in folders:
        for d in sorted(Path(folder).iterdir()):
            if not (d / "truth.json").exists():
                continue
            seed = json.loads((d / "truth.json").read_text()).get("seed")
            if seed is None or splits.split_of(int(seed)) != split:
                raise DataError(f"{d}: seed {seed} is not in the {split} range (ctlesion_phantoms.splits)")
            out.append(d)
        if not out:
            raise DataError(f"{folder}: no generated cases (subfolders with truth.json)")
    return out


def train(cfg: TrainConfig, resume: bool = True, release: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) a training; returns the summary written to OUT/summary.json."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.data:
        train_cases, val_cases = load_data_cases(cfg)
    else:  # the default: phantoms, generated when missing
        data = Path(cfg.data_dir)
        phantom = PhantomConfig() if cfg.phantom_slices_max is None else PhantomConfig(slices_max=cfg.phantom_slices_max)
        train_dirs = ensure_cases(data / "train", [cfg.train_seed + i for i in range(cfg.train_cases)], phantom)
        val_dirs = ensure_cases(data / "validation", [cfg.val_seed + i for i in range(cfg.val_cases)], phantom)
        train_dirs += generated_case_dirs(cfg.train_dirs)
        val_dirs += generated_case_dirs(cfg.val_dirs, "validation")
        train_cases = load_cases(train_dirs, cfg.window, cfg.workers, cfg.pixel_mm, cfg.context_mm)
        val_cases = load_cases(val_dirs, cfg.window, cfg.workers, cfg.pixel_mm, cfg.context_mm)
    sampler = CropSampler(
        train_cases, crop=cfg.crop, k=cfg.k, p_positive=cfg.p_positive, hard_weight=cfg.hard_weight,
        nodule_balance=cfg.nodule_balance,
    )
    val = ValSet.build(val_cases, cfg.k, cfg.val_slices_max, cfg.seed, cfg.model_size)
    print(
        f"data: {len(train_cases)} training cases ({sampler.num_positive_slices} slices with nodules, "
        f"{sampler.num_hard_boxes} hard-nodule boxes weighted x{cfg.hard_weight:g}), "
        f"validation {len(val.images)} slices from {len(val_cases)} cases; device {device}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    model, report = build_detector(cfg)
    if report is not None:
        print(f"pretrained: {report.summary()}", flush=True)
    model.to(device)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau)
    total = cfg.epochs * cfg.steps_per_epoch
    step, start_epoch, best, history = 0, 0, -1.0, []
    rng = np.random.default_rng(cfg.seed)
    last = out / "last.pt"
    if resume and last.exists():
        # Tensors and plain containers only: a last.pt from elsewhere cannot run code when loaded.
        state = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        progress = json.loads(state["progress_json"])
        ema.updates = progress["ema_updates"]
        step, start_epoch, best, history = progress["step"], progress["epoch"], progress["best"], progress["history"]
        rng.bit_generator.state = progress["rng"]
        print(f"resumed from {last} at epoch {start_epoch}, step {step}", flush=True)

    aug = AugmentConfig()
    batches = batch_source(sampler, rng, cfg, aug, step)
    t_start = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        bar = tqdm(range(cfg.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=quiet)
        for _ in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, total)
            images, targets = next(batches)
            images = images.to(device, non_blocking=True)
            loss = model.compute_loss(model(images), [t.to(device, non_blocking=True) for t in targets])
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model)
            step += 1
            parts = loss.as_dict()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{parts['total']:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        train_loss = {k: v / cfg.steps_per_epoch for k, v in sums.items()}
        try:
            metrics = validate(ema.ema, val, device)
        except Exception as exc:  # a broken validation must not throw away hours of training
            print(f"validation failed: {exc!r}", file=sys.stderr, flush=True)
            metrics = {"error": repr(exc)}
        score = float(metrics.get("map50", -1.0))
        score = -1.0 if math.isnan(score) else score  # no truth boxes in validation: keep the latest
        record = {"epoch": epoch + 1, "step": step, "elapsed_s": round(time.time() - t_start, 1),
                  "train": train_loss, "val": metrics}
        history.append(record)
        print(json.dumps(record), flush=True)
        if score > best or score < 0 or not (out / "best.pt").exists():
            best = score
            torch.save(release_state(ema.ema, cfg, epoch + 1, metrics), out / "best.pt")
        # Counters, history and RNG state as JSON (the RNG's 128-bit integers survive JSON exactly).
        progress = {"ema_updates": ema.updates, "step": step, "epoch": epoch + 1, "best": best,
                    "history": history, "rng": rng.bit_generator.state, "config": asdict(cfg)}
        torch.save(
            {"model": model.state_dict(), "ema": ema.ema.state_dict(), "optimizer": opt.state_dict(),
             "progress_json": json.dumps(progress, default=_plain)},
            out / "last.pt.tmp",
        )
        os.replace(out / "last.pt.tmp", last)

    summary = {
        "config": asdict(cfg),
        "best_map50": best,
        "history": history,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {device}, torch {torch.__version__}",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if release is not None and (out / "best.pt").exists():
        release_checkpoint(out / "best.pt", release)
    return summary


def release_checkpoint(best: Path, dest: Path) -> Path:
    """``best.pt`` -> the committed form: same keys and meta, float tensors as fp16 (half the bytes)."""
    state = torch.load(best, map_location="cpu", weights_only=True)
    sd = {k: v.half() if v.dtype == torch.float32 else v for k, v in state["model"].items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "meta": state["meta"]}, dest)
    print(f"released {dest} ({dest.stat().st_size / 1e6:.1f} MB, epoch {state['meta']['epoch']})")
    return dest


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="ctlesion train", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default=d.variant, help=f"DAMO-YOLO variant (default {d.variant})")
    p.add_argument("--train-cases", type=int, default=d.train_cases)
    p.add_argument("--val-cases", type=int, default=d.val_cases)
    p.add_argument("--data-dir", default=d.data_dir, help="phantom cases are generated here if missing")
    p.add_argument("--data", default=None, metavar="KIND:DIR",
                   help="train on real data instead of phantoms: luna16:DIR, lidc:DIR or dicomcsv:DIR")
    p.add_argument("--folds", default=None, help="with --data: training folds, e.g. 0-7 (default: all but validation and test)")
    p.add_argument("--val-folds", default=None, help="with --data: validation folds (default: the fold after --test-fold)")
    p.add_argument("--test-fold", type=int, default=None, help="with --data: the fold kept out for ctlesion evaluate --fold")
    p.add_argument("--cache-dir", default=d.cache_dir, help="with --data: DICOM written from MetaImage, windowed slices")
    p.add_argument("--min-readers", type=int, default=d.min_readers, help="lidc: readers of 4 agreeing on a nodule")
    p.add_argument("--out", default=d.out_dir, help="last.pt (resume), best.pt, summary.json")
    p.add_argument("--train-dir", action="append", default=[], dest="train_dirs", metavar="DIR",
                   help="more generated training cases (e.g. ctlesion phantom --profile wide --seed 100000 ...); repeatable")
    p.add_argument("--val-dir", action="append", default=[], dest="val_dirs", metavar="DIR",
                   help="more generated validation cases for model selection (validation seeds); repeatable")
    p.add_argument("--val-slices-max", type=int, default=d.val_slices_max,
                   help="whole slices validated per epoch (nodule slices first, as many lung-only ones)")
    p.add_argument("--pixel-mm", type=mm_or_none, default=d.pixel_mm, help=f"model pixel size in mm, 'none': native (default {d.pixel_mm})")
    p.add_argument("--context-mm", type=mm_or_none, default=d.context_mm,
                   help=f"2.5D plane offset in mm, 'none': neighbouring slices (default {d.context_mm})")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--crop", type=int, default=d.crop, help="training crop size (multiple of 32)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--pretrained", default=None, help="official DAMO-YOLO checkpoint to fine-tune from")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--workers", type=int, default=d.workers,
                   help="processes that decode series and make batches (GPU nodes; 0 = none, resumes bit-exactly)")
    p.add_argument("--hard-weight", type=float, default=d.hard_weight,
                   help="draw boxes of juxtapleural / juxtavascular / < 8 mm nodules this many times as often")
    p.add_argument("--nodule-balance", type=float, default=d.nodule_balance,
                   help="weight each box by (boxes of its nodule) ** -this: 0 = by slice, 1 = every nodule equally often")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    p.add_argument("--release", type=Path, default=None, help="write the best EMA model here (fp16)")
    p.add_argument("--release-only", action="store_true", help="just write OUT/best.pt to --release and exit")
    p.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The command line as a TrainConfig (what main trains with)."""
    return TrainConfig(
        variant=args.variant, train_cases=args.train_cases, val_cases=args.val_cases, data_dir=args.data_dir,
        out_dir=args.out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        crop=args.crop, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, seed=args.seed,
        pretrained=args.pretrained, device=args.device, threads=args.threads, workers=args.workers,
        hard_weight=args.hard_weight, nodule_balance=args.nodule_balance, data=args.data, folds=args.folds,
        val_folds=args.val_folds,
        test_fold=args.test_fold, cache_dir=args.cache_dir, min_readers=args.min_readers,
        train_dirs=list(args.train_dirs), val_dirs=list(args.val_dirs), val_slices_max=args.val_slices_max,
        pixel_mm=args.pixel_mm, context_mm=args.context_mm,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.release_only:
        if args.release is None:
            print("--release-only needs --release PATH", file=sys.stderr)
            return 2
        release_checkpoint(Path(args.out) / "best.pt", args.release)
        return 0
    if args.crop % 32:
        print("--crop must be a multiple of 32", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    try:
        train(cfg, resume=not args.no_resume, release=args.release, quiet=args.quiet)
    except (FileNotFoundError, DataError) as exc:
        print(f"ctlesion train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
