"""Pick and build the image encoder the worker serves with (``MODERATOR_ENCODER_BACKEND``).

``onnx`` (default): ONNX Runtime, no torch anywhere on the import path.
``torch``: the open_clip model from the export's safetensors (needs ``moderator[train]``);
on CUDA it runs fp16 with CUDA graphs per batch-size bucket and, when asked,
decodes JPEGs on the GPU. The two answer the same ``encode_pixels`` call, so
the pipeline does not care which one it has.
"""

from __future__ import annotations

from dataclasses import dataclass

from moderator.encode.model_dir import ModelDirectory
from moderator.encode.onnx_backend import ImageEncoder, OrtOptions


@dataclass(frozen=True)
class TorchOptions:
    device: str = "auto"  # auto: cuda when available
    fp16: bool = True  # CUDA only; CPU runs fp32
    cuda_graphs: bool = True  # CUDA only
    max_batch: int = 32  # graphs are captured for power-of-two buckets up to this
    gpu_decode: bool = True  # CUDA only: nvJPEG batch decode + GPU resize


def resolve_torch_device(device: str, device_id: int = 0) -> str:
    from moderator.encode.torch_backend import _torch  # noqa: PLC0415

    torch = _torch()
    if device == "auto":
        return f"cuda:{device_id}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{device_id}"
    return device


def open_image_encoder(model_dir: ModelDirectory, backend: str = "onnx", *, ort: OrtOptions = OrtOptions(),
                       torch: TorchOptions = TorchOptions(), device_id: int = 0):
    """The image encoder for ``backend``. Raises ``ModelError``/``MissingDependency`` with a
    clear message when the backend or device cannot be had (never a silent CPU fallback
    for an explicit ``cuda``)."""
    if backend == "onnx":
        return ImageEncoder(model_dir, options=ort)
    if backend != "torch":
        from moderator.errors import ModelError  # noqa: PLC0415

        raise ModelError(f"unknown encoder backend {backend!r} (onnx or torch)")
    from moderator.encode.torch_backend import TorchImageEncoder  # noqa: PLC0415

    device = resolve_torch_device(torch.device, device_id)
    on_cuda = device.startswith("cuda")
    return TorchImageEncoder(model_dir, device=device, fp16=torch.fp16 and on_cuda,
                             cuda_graphs=torch.cuda_graphs and on_cuda, max_batch=torch.max_batch)
