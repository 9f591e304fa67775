"""Export side (needs the 'export' extra: torch, transformers, onnx): checkpoints, LoRA merge, router, ONNX.

Imports from here go only to ``megaedge.manifest`` / ``megaedge.runtime`` helpers that are light, never the reverse.
"""
