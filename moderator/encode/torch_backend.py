"""Torch encoders with the same interface as the ONNX ones (needs the ``train`` extra).

Used where torch is installed: parity tests, and GPU throughput (fp16 and CUDA
graphs on CUDA). The worker only imports this module when asked to.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from PIL import Image

from moderator.encode.model_dir import ModelDirectory
from moderator.encode.preprocess import ImagePreprocessor
from moderator.encode.tokenizer import ClipTokenizer
from moderator.errors import MissingDependency, ModelError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "open_clip_model.safetensors"


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingDependency("the torch backend needs `pip install moderator[train]`") from e
    return torch


def load_open_clip(model_dir: ModelDirectory, device: str = "cpu"):
    """Rebuild the open_clip model of an exported directory from its safetensors weights."""
    torch = _torch()
    import open_clip  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    m = model_dir.manifest
    if WEIGHTS_FILE not in m.files or m.model_config_json is None:
        raise ModelError(f"{model_dir.path}: no torch weights ({WEIGHTS_FILE}) in this export")
    cfg = dict(m.model_config_json)
    custom_text = cfg.pop("custom_text", False)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**cfg)
    state = load_file(str(model_dir.file(WEIGHTS_FILE)), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval().to(torch.device(device))


class _TorchEncoder:
    def __init__(self, model_dir: ModelDirectory | str, *, device: str | None = None,
                 fp16: bool | None = None, cuda_graphs: bool | None = None) -> None:
        torch = _torch()
        self.model_dir = md = model_dir if isinstance(model_dir, ModelDirectory) else ModelDirectory(model_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cuda = self.device.startswith("cuda")
        self.fp16 = on_cuda if fp16 is None else fp16
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.model = load_open_clip(md, self.device)
        if self.fp16:
            self.model = self.model.half()
        self._graphs: dict[tuple, tuple] = {}
        log.info("torch encoder on %s fp16=%s cuda_graphs=%s", self.device, self.fp16, self.cuda_graphs)

    def _forward(self, x):
        raise NotImplementedError

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = _torch()
        if x.shape[0] == 0:
            return np.zeros((0, self.model_dir.manifest.embed_dim), dtype=np.float32)
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True)
        if t.is_floating_point() and self.fp16:
            t = t.half()
        with torch.inference_mode():
            out = self._graphed(t) if self.cuda_graphs else self._forward(t)
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy()

    def _graphed(self, t):
        """Replay a CUDA graph captured once per input shape (batch size)."""
        torch = _torch()
        key = (tuple(t.shape), t.dtype)
        if key not in self._graphs:
            static_in = t.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm up kernels / allocator outside the graph
                    self._forward(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(t)
        graph.replay()
        return static_out.clone()

    def runtime_info(self) -> dict:
        torch = _torch()
        return {
            "backend": "torch",
            "torch": torch.__version__,
            "device": self.device,
            "fp16": self.fp16,
            "cuda_graphs": self.cuda_graphs,
            "model_sha256": self.model_dir.model_sha256,
        }


class TorchImageEncoder(_TorchEncoder):
    def __init__(self, model_dir, **kw) -> None:
        super().__init__(model_dir, **kw)
        self.preprocessor = ImagePreprocessor(self.model_dir.manifest.preprocess)

    def _forward(self, x):
        return self.model.encode_image(x)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(pixels)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._run(self.preprocessor.batch(images))


class TorchTextEncoder(_TorchEncoder):
    def __init__(self, model_dir, **kw) -> None:
        kw.setdefault("cuda_graphs", False)
        super().__init__(model_dir, **kw)
        md = self.model_dir
        self.tokenizer = ClipTokenizer(md.manifest.tokenizer, md.file(md.manifest.tokenizer.file))

    def _forward(self, x):
        return self.model.encode_text(x)

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self._run(tokens)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(self.tokenizer(list(texts)))
