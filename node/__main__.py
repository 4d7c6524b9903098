"""``python -m ctlesion_node --config node.toml`` (the same as ``ctlesion node``)."""

from ctlesion_node.cli import main

raise SystemExit(main())
