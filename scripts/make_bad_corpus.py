"""Write the malformed / hostile DICOM corpus (tests/bad_dicom_corpus.py) as files.

    .venv/bin/python scripts/make_bad_corpus.py --out work/bad_corpus

One folder per case (``<name>/item_000.dcm`` ...) plus ``index.json`` with each case's expected
refusal, the source the message must name and the limits it was built for. The bytes are built in
code each time, so nothing binary is committed; the files are for manual checks (dcmdump, a PACS,
another server) and for replaying a case with ``ctlesion detect``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_corpus(out: Path) -> list[dict[str, object]]:
    sys.path.insert(0, str(REPO_ROOT / "tests"))  # bad_dicom_corpus / dicom_factory are test helpers
    from bad_dicom_corpus import build_cases

    out.mkdir(parents=True, exist_ok=True)
    index: list[dict[str, object]] = []
    for case in build_cases():
        folder = out / case.name
        folder.mkdir(exist_ok=True)
        for old in folder.glob("item_*.dcm"):  # a re-run must not leave items of an older version
            old.unlink()
        for i, item in enumerate(case.items):
            (folder / f"item_{i:03d}.dcm").write_bytes(item)
        index.append(
            {
                "name": case.name,
                "items": len(case.items),
                "bytes": sum(len(x) for x in case.items),
                "expect": case.expect,
                "source": case.source,
                "description": case.description,
                "limits": case.limits.to_dict() if case.limits else None,
            }
        )
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the cases into")
    args = parser.parse_args(argv)
    index = write_corpus(args.out)
    print(f"wrote {len(index)} cases, {sum(int(c['items']) for c in index)} items, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
