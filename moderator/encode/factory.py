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
    from moderator.encode.torch_backend import TorchImageEncoder, resolve_device  # noqa: PLC0415

    device = resolve_device(None if torch.device == "auto" else
                            f"cuda:{device_id}" if torch.device == "cuda" else torch.device)
    on_cuda = device.type == "cuda"
    enc = TorchImageEncoder(model_dir, device=str(device), fp16=torch.fp16 and on_cuda,
                            cuda_graphs=torch.cuda_graphs and on_cuda, max_batch=torch.max_batch,
                            gpu_decode=torch.gpu_decode and on_cuda)
    enc.warmup()  # capture the CUDA graphs now, not on the first batches of live traffic
    return enc
