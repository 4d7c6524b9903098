"""The ``ctlesion`` command: one entry point, subcommands dispatched lazily.

Each subcommand lives in the module that does the work and exposes ``main(argv) -> int``; importing
them lazily keeps ``ctlesion --help`` fast and lets a machine without torch still run the client.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ctlesion_client.demo:main", "the main job: serve the CPU repository, detect a phantom series, report"),
    "detect": ("ctlesion_client.detect_cli:main", "send a DICOM series (dir or files) to a server, print findings"),
    "serve": ("ctlesion_client.server:main", "start the real tritonserver on a model repository"),
    "process-study": ("ctlesion_client.pacs:main", "PACS -> detect -> DICOM SR -> PACS"),
    "node": ("ctlesion_node.cli:main", "DICOM node: receive studies by C-STORE, detect, send SR + key images back"),
    "phantom": ("ctlesion_phantoms.cli:main", "generate phantom CT series (DICOM + truth)"),
    "testgen": ("ctlesion_testgen.cli:main", "independent test-only CT generator (DICOM + truth), never for training"),
    "variants": ("damoyolo.variants:main", "DAMO-YOLO variants: params / GFLOPs vs the official table"),
    "train": ("damoyolo.train:main", "train the detector on phantom series"),
    "evaluate": ("damoyolo.evaluate:main", "mAP and LUNA16 FROC / CPM on held-out phantoms"),
    "export": ("ctlesion_export.cli:main", "checkpoint -> ONNX (and INT8 QDQ)"),
    "build-repo": ("ctlesion_export.build_repo:main", "write a Triton model repository (cpu / gpu targets)"),
    "build-engine": ("ctlesion_export.tensorrt_engine:main", "build TensorRT FP16 / INT8 engines"),
    "loadtest": ("ctlesion_bench.loadtest:main", "locust load test against a running server"),
    "bench": ("ctlesion_bench.bench:main", "side-by-side serving benchmark"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: ctlesion COMMAND [options]   (ctlesion COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"ctlesion: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    sys.argv = [f"ctlesion {name}", *rest]  # argparse prog names in --help
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
