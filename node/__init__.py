"""ctlesion_node: a DICOM node next to a PACS.

The PACS (or a scanner) pushes studies by C-STORE; each instance is on disk before it is
acknowledged; a series is complete after a quiet period; readable axial CT series go through the
Triton ensemble with ``ctlesion_client.LesionClient``; the TID 1500 SR and one key-image Secondary
Capture per finding go back by C-STORE or STOW-RS. Every step is a state file on disk, so a
``kill -9`` at any moment loses nothing and repeats nothing on restart. See docs/node.md.
"""

from __future__ import annotations

from ctlesion_node.config import NodeConfig, load_config

__all__ = ["NodeConfig", "load_config"]
