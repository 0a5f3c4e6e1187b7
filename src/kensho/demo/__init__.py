"""The embedded demo: a tiny causal language model shipped inside the package.

It is built by ``scripts/make_demo_model.py`` from text written for this project, so
``kensho up`` works offline on a fresh machine: the folder below serves as a mirror
source from which the store is filled and verified.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_MANIFEST", "DEMO_MODEL_DIR"]

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
DEMO_MANIFEST = Path(__file__).resolve().parent / "manifest.json"
