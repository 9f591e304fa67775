"""The lean on-device runtime: numpy, onnxruntime (or TensorRT), tokenizers, soundfile. Never torch."""
