"""Logging of the CLI: megaedge's warnings always, other libraries' warnings only with -v, their errors always."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import logging, sys, warnings
from megaedge.progress import setup_logging
setup_logging(int(sys.argv[1]))
logging.getLogger("megaedge.export").warning("own warning")
logging.getLogger("megaedge.runtime").info("own info")
logging.getLogger().warning("quantizer note")  # onnxruntime's quantizer logs on the root logger
logging.getLogger("transformers").warning("library warning")
warnings.warn("deprecated thing", DeprecationWarning)
warnings.warn("user warning")
logging.getLogger("onnxruntime").error("library error")
import torch  # after setup_logging, as the CLI imports it
from megaedge.export.bundle import quiet_exporter_logs
quiet_exporter_logs()  # as every graph export does first
logging.getLogger("torch.onnx._internal.exporter._registration").warning("torch exporter note")
"""


def _stderr(verbosity: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    return subprocess.run([sys.executable, "-c", CODE, str(verbosity)], capture_output=True, text=True,
                          env=env).stderr


def test_third_party_warnings_only_with_verbose():
    quiet = _stderr(0)
    assert "own warning" in quiet and "library error" in quiet
    for hidden in ("own info", "quantizer note", "library warning", "deprecated thing", "user warning", "torch exporter note"):
        assert hidden not in quiet, hidden
    loud = _stderr(1)
    for shown in ("own warning", "own info", "quantizer note", "library warning", "library error", "torch exporter note"):
        assert shown in loud, shown
