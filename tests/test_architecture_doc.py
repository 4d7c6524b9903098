"""docs/architecture.md and its picture agree with the tree: every module they name exists, the
table and the picture name the same modules, and every product package appears in the document."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
sys.path.insert(0, str(REPO / "scripts"))

from draw_architecture import OFFLINE, STAGES  # noqa: E402


def _doc_modules() -> set[str]:
    return set(re.findall(r"`([\w/.-]+\.py)`", DOC.read_text()))


def _picture_modules() -> set[str]:
    return {m for _, _, mods in STAGES for m in mods} | {m for _, mods in OFFLINE for m in mods}


def test_every_named_module_exists() -> None:
    missing = sorted(m for m in _doc_modules() | _picture_modules() if not (REPO / m).is_file())
    assert not missing, f"docs/architecture.md or scripts/draw_architecture.py name modules that do not exist: {missing}"


def test_table_and_picture_name_the_same_modules() -> None:
    doc = _doc_modules() - {"scripts/draw_architecture.py", "tests/test_architecture_doc.py"}
    assert doc == _picture_modules(), {"only in the doc": sorted(doc - _picture_modules()),
                                       "only in the picture": sorted(_picture_modules() - doc)}


def test_every_product_package_is_named() -> None:
    """A package someone adds to pyproject must find its place in the data flow."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = config.get("package-dir", {})
    text = DOC.read_text()
    unnamed = []
    for package in config["packages"]:
        top = package.split(".")[0]
        folder = dirs.get(top, top) + package[len(top):].replace(".", "/")
        if not (REPO / folder).is_dir() or not list((REPO / folder).glob("*.py")):
            continue  # a data-only package (damoyolo.structures)
        if f"`{folder}/" not in text:
            unnamed.append(f"{package} ({folder}/)")
    assert not unnamed, f"product packages docs/architecture.md does not place in the data flow: {unnamed}"
