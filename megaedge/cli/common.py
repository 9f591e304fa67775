"""Helpers shared by CLI commands (argument types, JSON output)."""

from __future__ import annotations

import json
import sys

from megaedge.errors import require


def need_export_extra() -> None:
    """Fail with the pip command that fixes it when torch/transformers are missing."""
    for module in ("torch", "transformers", "safetensors"):
        require(module, "export")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
