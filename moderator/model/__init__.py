"""Offline model tools: export, synthetic data, fine-tuning, the demo model.

Everything here needs the ``train`` extra (torch, open_clip_torch, onnx). The
streaming worker never imports this package.
"""
