"""Torch encoders with the same interface as the ONNX ones (needs the ``train`` extra).

Used where torch is installed: parity tests, and GPU throughput. The worker only
imports this module when asked to.

On CUDA the image encoder is built for throughput, because each of these cost a
large share of a ViT-B/32 forward pass at serving batch sizes:

- **CUDA graphs per batch-size bucket.** A batch is padded up to the next bucket
  (powers of two up to ``max_batch`` by default), that bucket's graph is replayed
  and the result sliced. The number of graphs is bounded by the bucket list, not by
  the batch sizes a micro-batcher happens to close; all graphs share one memory
  pool, which is safe because replays never overlap (one lock) and each output is
  consumed before the next replay (pytorch/pytorch#166975).
- **Pinned staging.** Host arrays are copied into reused page-locked buffers and
  uploaded with ``non_blocking=True``; ``encode_uint8`` uploads resized+cropped
  uint8 pixels (4x fewer bytes than float32) and normalises on the device.
- **No host round trip after GPU decode.** ``encode_tensor`` takes a normalised
  tensor already on the device (``DeviceJpegPreprocessor``'s output).

On the CPU the same code runs without pinning or graphs (padding to buckets only
when asked, so the tests can check it).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from moderator.encode.model_dir import ModelDirectory
from moderator.encode.preprocess import ImagePreprocessor, uint8_layout
from moderator.encode.tokenizer import ClipTokenizer
from moderator.errors import MissingDependency, ModelError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "open_clip_model.safetensors"
DEFAULT_MAX_BATCH = 256


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingDependency("the torch backend needs `pip install moderator[train]`") from e
    return torch


def resolve_device(device: str | None):
    """``device`` as a ``torch.device`` (``None``: CUDA when available, else CPU).

    A CUDA device that this process cannot use is a ``ModelError`` that says why,
    rather than a failure at the first batch.
    """
    torch = _torch()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelError(f"invalid torch device {device!r}: {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {device!r} needs CUDA, but torch.cuda.is_available() is False here "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type == "cuda" and dev.index is None:  # pin it: tensors report cuda:N, and so does runtime_info
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def batch_buckets(max_batch: int = DEFAULT_MAX_BATCH) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch``: padding wastes < 50%."""
    if max_batch < 1:
        raise ModelError(f"max_batch must be >= 1, not {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def _check_buckets(buckets: Sequence[int] | None, max_batch: int) -> tuple[int, ...]:
    if buckets is None:
        return batch_buckets(max_batch)
    try:
        out = tuple(sorted({int(b) for b in buckets}))
    except (TypeError, ValueError) as e:
        raise ModelError(f"batch_buckets must be integers, not {buckets!r}") from e
    if not out or out[0] < 1:
        raise ModelError(f"batch_buckets must be positive integers, not {buckets!r}")
    return out


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


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    static_in: Any  # (bucket, ...) input the graph reads
    static_out: Any  # (bucket, dim) output the graph writes


class _Staging:
    """Two reused pinned host buffers for one input shape, alternated, each with the
    CUDA event of its last upload: a buffer is only refilled once its previous
    ``non_blocking`` copy has finished, and the next chunk's host copy overlaps the
    previous chunk's upload and forward pass."""

    def __init__(self, torch, rows: int, shape: tuple[int, ...], dtype) -> None:
        self.buffers = [torch.empty((rows, *shape), dtype=dtype, pin_memory=True) for _ in range(2)]
        self.events = [None, None]
        self.next = 0

    def upload(self, torch, host, device):
        i, self.next = self.next, 1 - self.next
        if self.events[i] is not None:
            self.events[i].synchronize()
        buf = self.buffers[i][: host.shape[0]]
        buf.copy_(host)
        out = buf.to(device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(device))
        self.events[i] = ev
        return out


class _TorchEncoder:
    """Device, precision, bucketing, staging and graphs; subclasses define ``_forward``.

    ``device``: "cpu", "cuda", "cuda:1" ... (``None``: CUDA when available).
    ``fp16``: half-precision weights and inputs (default: on CUDA).
    ``cuda_graphs``: replay captured graphs (default: on CUDA; ``True`` without CUDA is
    a ``ModelError``). ``max_batch`` / ``batch_buckets``: a batch is run in chunks of at
    most the largest bucket; with ``pad_batches`` (default: when graphs are on) each
    chunk is padded to the smallest bucket that holds it.
    """

    def __init__(self, model_dir: ModelDirectory | str, *, device: str | None = None,
                 fp16: bool | None = None, cuda_graphs: bool | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, batch_buckets: Sequence[int] | None = None,
                 pad_batches: bool | None = None) -> None:
        torch = _torch()
        self.model_dir = md = model_dir if isinstance(model_dir, ModelDirectory) else ModelDirectory(model_dir)
        self._device = resolve_device(device)
        self.device = str(self._device)
        on_cuda = self._device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ModelError(f"cuda_graphs=True needs a CUDA device, not {self.device!r}")
        self.fp16 = on_cuda if fp16 is None else bool(fp16)
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        self.batch_buckets = _check_buckets(batch_buckets, max_batch)
        self.max_batch = self.batch_buckets[-1]
        self.pad_batches = self.cuda_graphs if pad_batches is None else bool(pad_batches)
        if self.cuda_graphs and not self.pad_batches:
            raise ModelError("cuda_graphs needs pad_batches (a graph runs one fixed batch size)")
        self._pinned = on_cuda
        self.model = load_open_clip(md, self.device)
        if self.fp16:
            self.model = self.model.half()
        self.input_dtype = torch.float16 if self.fp16 else torch.float32
        self._graphs: dict[tuple, _Graph] = {}
        self._graph_pool = None
        self._staging: dict[tuple, _Staging] = {}
        self._lock = threading.Lock()  # graphs, static buffers and staging are shared state
        log.info("torch encoder on %s fp16=%s cuda_graphs=%s buckets=%s", self.device, self.fp16,
                 self.cuda_graphs, self.batch_buckets)

    # --- subclass hooks ---------------------------------------------------------

    def _forward(self, x):
        raise NotImplementedError

    def _prepare(self, x):
        """A device tensor as uploaded -> the model's input (dtype, layout, normalisation)."""
        return x

    # --- the pipeline -------------------------------------------------------------

    def bucket_for(self, n: int) -> int:
        """The batch size a chunk of ``n`` rows runs at (``n`` itself without padding)."""
        if not self.pad_batches:
            return n
        for b in self.batch_buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} rows exceed the largest bucket {self.max_batch}")

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.model_dir.manifest.embed_dim), dtype=np.float32)

    def _run_host(self, x: np.ndarray, prepare=None) -> np.ndarray:
        """Host array (N, ...) -> L2-normalised float32 (N, dim), in chunks of ``max_batch``."""
        torch = _torch()
        if x.shape[0] == 0:
            return self._empty()
        prepare = prepare or self._prepare
        host = torch.from_numpy(np.ascontiguousarray(x))
        outs = []
        with self._lock, torch.inference_mode():
            for start in range(0, host.shape[0], self.max_batch):
                outs.append(self._execute(prepare(self._upload(host[start:start + self.max_batch]))))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            return out.cpu().numpy()

    def _run_device(self, t) -> np.ndarray:
        """A model-ready tensor (N, ...) on the device -> L2-normalised float32 (N, dim)."""
        torch = _torch()
        if t.shape[0] == 0:
            return self._empty()
        outs = []
        with self._lock, torch.inference_mode():
            for start in range(0, t.shape[0], self.max_batch):
                outs.append(self._execute(t[start:start + self.max_batch]))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            return out.cpu().numpy()

    def _upload(self, host):
        if not self._pinned:
            return host.to(self._device)
        torch = _torch()
        key = (host.dtype, tuple(host.shape[1:]))
        staging = self._staging.get(key)
        if staging is None:
            if len(self._staging) >= 4:  # a new input shape: bound the pinned memory held
                for s in self._staging.values():
                    for ev in s.events:
                        if ev is not None:
                            ev.synchronize()
                self._staging.clear()
            staging = self._staging[key] = _Staging(torch, self.max_batch, key[1], host.dtype)
        return staging.upload(torch, host, self._device)

    def _execute(self, x):
        """Model-ready device tensor with <= max_batch rows -> normalised float32 embeddings."""
        torch = _torch()
        n = x.shape[0]
        bucket = self.bucket_for(n)
        if self.cuda_graphs:
            g = self._graph(bucket, tuple(x.shape[1:]), x.dtype)
            g.static_in[:n].copy_(x)
            if n < bucket:
                g.static_in[n:].zero_()  # padding rows: deterministic, and never NaN
            g.graph.replay()
            out = g.static_out[:n]
        elif bucket > n:
            out = self._forward(torch.cat([x, x.new_zeros((bucket - n, *x.shape[1:]))]))[:n]
        else:
            out = self._forward(x)
        # a fresh tensor: the graph's static output is overwritten by the next replay
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def _graph(self, bucket: int, shape: tuple[int, ...], dtype) -> _Graph:
        key = (bucket, shape, dtype)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(bucket, shape, dtype)
        return g

    def _capture(self, bucket: int, shape: tuple[int, ...], dtype) -> _Graph:
        torch = _torch()
        with torch.cuda.device(self._device):
            static_in = torch.zeros((bucket, *shape), dtype=dtype, device=self._device)
            side = torch.cuda.Stream(self._device)
            side.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(side):
                for _ in range(3):  # kernel selection, cuBLAS workspaces, allocator: outside the graph
                    self._forward(static_in)
            torch.cuda.current_stream(self._device).wait_stream(side)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local, as torch.compile's CUDA-graph trees capture: another thread's
            # CUDA work (a decoder thread allocating) must not abort this capture
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                static_out = self._forward(static_in)
        log.info("captured a CUDA graph for batch %d %s %s", bucket, shape, dtype)
        return _Graph(graph, static_in, static_out)

    def runtime_info(self) -> dict:
        torch = _torch()
        info = {
            "backend": "torch",
            "torch": torch.__version__,
            "device": self.device,
            "fp16": self.fp16,
            "cuda_graphs": self.cuda_graphs,
            "batch_buckets": list(self.batch_buckets),
            "pad_batches": self.pad_batches,
            "graphs_captured": sorted(k[0] for k in self._graphs),
            "pinned_staging": self._pinned,
            "model_sha256": self.model_dir.model_sha256,
        }
        if self._device.type == "cuda":
            info["cuda_device_name"] = torch.cuda.get_device_name(self._device)
            info["cuda"] = torch.version.cuda
        return info


class TorchImageEncoder(_TorchEncoder):
    """CLIP image encoder on torch; same ``encode`` / ``encode_pixels`` as ``ImageEncoder``.

    Three ways in, by where the pixels are: ``encode_pixels`` (host float32 NCHW,
    normalised), ``encode_uint8`` (host uint8, resized and cropped, normalised on the
    device: the cheapest upload), ``encode_tensor`` (a normalised tensor already on the
    device, e.g. from ``DeviceJpegPreprocessor``). All return L2-normalised float32
    (N, embed_dim) numpy arrays.
    """

    def __init__(self, model_dir, *, gpu_decode: bool | None = None, **kw) -> None:
        super().__init__(model_dir, **kw)
        torch = _torch()
        pre = self.model_dir.manifest.preprocess
        self.preprocessor = ImagePreprocessor(pre)
        self.image_size: tuple[int, int] = tuple(pre.image_size)
        self._mean = torch.tensor(pre.mean, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std, dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        # the device JPEG path for this model's preprocessing (default: on CUDA only; on
        # the CPU, Pillow with JPEG draft decoding is the faster path)
        self.device_jpeg = None
        if gpu_decode is None:
            gpu_decode = self._device.type == "cuda"
        if gpu_decode:
            from moderator.encode.device_preprocess import DeviceJpegPreprocessor  # noqa: PLC0415

            self.device_jpeg = DeviceJpegPreprocessor(pre, self.device)

    def _forward(self, x):
        return self.model.encode_image(x)

    def runtime_info(self) -> dict:
        return {**super().runtime_info(), "gpu_decode": self.device_jpeg is not None}

    def _prepare(self, x):
        return x.to(self.input_dtype)

    def _normalise_uint8(self, x, layout: str):
        # the same float32 arithmetic as ImagePreprocessor.to_array: bit-identical inputs
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0).sub_(self._mean).div_(self._std)
        return x.to(self.input_dtype).contiguous()

    def _check_shape(self, shape: tuple[int, ...], what: str) -> str:
        return uint8_layout(shape, self.image_size, what)

    def warmup(self, batch_sizes: Sequence[int] | None = None) -> list[int]:
        """Capture the graphs of the buckets that ``batch_sizes`` fall in (default: every
        bucket) so that no request pays for a capture (tens of ms to seconds each); on CUDA
        without graphs, run each bucket once (kernel selection, allocator). A no-op on the
        CPU. Returns the buckets. Call it at startup, before other threads use the GPU."""
        torch = _torch()
        sizes = self.batch_buckets if batch_sizes is None else batch_sizes
        buckets = sorted({self.bucket_for(min(int(n), self.max_batch)) for n in sizes if int(n) > 0})
        if self._device.type != "cuda":
            return buckets
        h, w = self.image_size
        with self._lock, torch.inference_mode():
            for b in buckets:
                if self.cuda_graphs:
                    self._graph(b, (3, h, w), self.input_dtype)
                else:
                    self._forward(torch.zeros((b, 3, h, w), dtype=self.input_dtype, device=self._device))
            torch.cuda.synchronize(self._device)
        return buckets

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised float32 NCHW pixels (``ImagePreprocessor.batch``) -> embeddings."""
        return self._run_host(np.asarray(pixels, dtype=np.float32))

    def encode_uint8(self, pixels: np.ndarray) -> np.ndarray:
        """Resized and cropped uint8 pixels, (N, H, W, 3) or (N, 3, H, W), not normalised
        (``ImagePreprocessor.resize_and_crop`` as arrays) -> embeddings."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:
            raise ValueError(f"encode_uint8 takes uint8 pixels, not {pixels.dtype}")
        if pixels.shape[0] == 0:
            return self._empty()
        layout = self._check_shape(pixels.shape, "encode_uint8")
        return self._run_host(pixels, prepare=lambda x: self._normalise_uint8(x, layout))

    def encode_tensor(self, pixels) -> np.ndarray:
        """A normalised float tensor (N, 3, H, W) on this encoder's device -> embeddings."""
        torch = _torch()
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"encode_tensor takes a torch.Tensor, not {type(pixels).__name__}")
        if pixels.device != self._device:
            raise ValueError(f"encode_tensor: tensor on {pixels.device}, encoder on {self.device}")
        if not pixels.is_floating_point():
            raise ValueError(f"encode_tensor takes normalised float pixels, not {pixels.dtype}")
        if pixels.shape[0] == 0:
            return self._empty()
        if self._check_shape(tuple(pixels.shape), "encode_tensor") != "NCHW":
            raise ValueError(f"encode_tensor takes NCHW, got {tuple(pixels.shape)}")
        return self._run_device(pixels.to(self.input_dtype))

    def encode_mixed(self, device_pixels, rows: Sequence[int | None],
                     host_pixels: Sequence[np.ndarray]) -> np.ndarray:
        """One batch from two sources, embeddings in ``rows`` order: output i is
        ``device_pixels[rows[i]]`` (normalised, on the device), or, where ``rows[i]`` is
        ``None``, the next of ``host_pixels``: the CPU path's uint8 (H, W, 3) images
        (``ImagePreprocessor.to_uint8``; uploaded as uint8, normalised on the device) or
        normalised float32 CHW arrays."""
        torch = _torch()
        rows = list(rows)
        host_at = [i for i, r in enumerate(rows) if r is None]
        if len(host_at) != len(host_pixels):
            raise ValueError(f"{len(host_at)} rows without a device row, {len(host_pixels)} host images")
        if not host_at:
            if rows == list(range(device_pixels.shape[0])):
                return self.encode_tensor(device_pixels)
            return self.encode_tensor(device_pixels[torch.tensor(rows, device=device_pixels.device)])
        h, w = self.image_size
        batch = torch.empty((len(rows), 3, h, w), dtype=torch.float32, device=self._device)
        dev_at = [i for i, r in enumerate(rows) if r is not None]
        if dev_at:
            src = device_pixels[torch.tensor([rows[i] for i in dev_at], device=device_pixels.device)]
            batch[torch.tensor(dev_at, device=self._device)] = src.to(self._device, torch.float32)
        stacked = np.stack(host_pixels)
        if stacked.dtype == np.uint8:  # a quarter of the bytes over the bus; the same float32 arithmetic
            layout = self._check_shape(stacked.shape, "encode_mixed")
            host = self._normalise_uint8(torch.from_numpy(stacked).to(self._device), layout).float()
        else:
            host = torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32)).to(self._device)
        batch[torch.tensor(host_at, device=self._device)] = host  # the few CPU-path images
        return self.encode_tensor(batch)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._run_host(self.preprocessor.batch(images))


class TorchTextEncoder(_TorchEncoder):
    def __init__(self, model_dir, **kw) -> None:
        kw.setdefault("cuda_graphs", False)
        super().__init__(model_dir, **kw)
        md = self.model_dir
        self.tokenizer = ClipTokenizer(md.manifest.tokenizer, md.file(md.manifest.tokenizer.file))

    def _forward(self, x):
        return self.model.encode_text(x)

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self._run_host(np.asarray(tokens))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._run_host(self.tokenizer(list(texts)))
