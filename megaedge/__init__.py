"""megaedge: Mega-ASR on edge devices.

Sub-packages: ``export`` (torch side: checkpoints, LoRA, ONNX), ``calibration`` (wild-audio simulation),
``runtime`` (numpy + onnxruntime only), ``cli``. Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
