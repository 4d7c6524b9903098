"""Variant descriptions (the official configs/damoyolo_*.py, as data) and the official model-zoo figures."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantSpec:
    name: str
    official_config: str  # file name in tinyvision/DAMO-YOLO configs/
    structure: str  # damoyolo/structures/<structure>.txt
    backbone: str  # res | csp | mob
    out_indices: tuple[int, int, int]
    act: str  # backbone and neck activation
    neck_in: tuple[int, int, int]
    neck_out: tuple[int, int, int]
    depth: float  # CSP stage depth n = round(3 * depth)
    hidden_ratio: float
    depthwise: bool
    reg_max: int
    head_kernel: int
    # Official model zoo (README of tinyvision/DAMO-YOLO): fused deploy model at `size`.
    size: int
    gflops: float
    params_m: float
    coco_map: float


_SPECS = (
    VariantSpec("T", "damoyolo_tinynasL20_T", "tinynas_L20_k1kx", "res", (2, 4, 5), "relu",
                (96, 192, 384), (64, 128, 256), 1.0, 1.0, False, 16, 3, 640, 18.1, 8.5, 42.0),
    VariantSpec("S", "damoyolo_tinynasL25_S", "tinynas_L25_k1kx", "res", (2, 4, 5), "relu",
                (128, 256, 512), (128, 256, 512), 1.0, 0.75, False, 16, 3, 640, 37.8, 16.3, 46.0),
    VariantSpec("M", "damoyolo_tinynasL35_M", "tinynas_L35_kxkx", "csp", (2, 3, 4), "silu",
                (128, 256, 512), (128, 256, 512), 1.5, 1.0, False, 16, 3, 640, 61.8, 28.2, 49.2),
    VariantSpec("L", "damoyolo_tinynasL45_L", "tinynas_L45_kxkx", "csp", (2, 3, 4), "silu",
                (128, 256, 512), (128, 256, 512), 2.0, 1.0, False, 16, 3, 640, 97.3, 42.1, 50.8),
    VariantSpec("Ns", "damoyolo_tinynasL18_Ns", "tinynas_nano_small", "mob", (2, 4, 5), "silu",
                (40, 80, 160), (40, 80, 160), 0.5, 0.5, True, 7, 1, 416, 1.56, 1.41, 32.3),
    VariantSpec("Nm", "damoyolo_tinynasL18_Nm", "tinynas_nano_middle", "mob", (2, 4, 5), "silu",
                (64, 128, 256), (64, 128, 256), 0.5, 0.5, True, 7, 1, 416, 3.69, 2.71, 38.2),
    VariantSpec("Nl", "damoyolo_tinynasL20_Nl", "tinynas_nano_large", "mob", (2, 4, 5), "silu",
                (80, 160, 320), (80, 160, 320), 0.5, 0.5, True, 7, 1, 416, 6.04, 5.69, 40.5),
)

VARIANTS: dict[str, VariantSpec] = {s.name: s for s in _SPECS}
ALIASES = {"ct": "T"}  # our CT default; see the package docstring for why


def get_spec(variant: str) -> VariantSpec:
    name = ALIASES.get(variant, variant)
    if name not in VARIANTS:
        known = ", ".join([*VARIANTS, *ALIASES])
        raise ValueError(f"unknown DAMO-YOLO variant {variant!r}; choose one of {known}")
    return VARIANTS[name]
