"""Encoder backends in the worker (MODERATOR_ENCODER_BACKEND) and the GPU-decode path of the
pipeline, run on the CPU: the same events through ONNX Runtime and through torch with the
device JPEG decoder give the same decisions and the same dead-letter reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from moderator.config import WorkerSettings
from moderator.errors import ModelError
from moderator.worker.bench import MemorySink, _feed_memory, photo_like_jpeg

from moderator.demo import DEMO_POLICY as DEMO_POLICY_PATH


def _events() -> list[tuple[bytes, bytes, list]]:
    from moderator.produce import OutgoingEvent, encode_image

    rng = np.random.default_rng(3)
    jpegs = [photo_like_jpeg(rng, w, h)[0] for w, h in ((320, 240), (240, 320), (200, 200), (640, 480))]
    png = encode_image(Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)), "PNG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (90, 60), (10, 200, 30, 0)).save(cmyk, "JPEG")
    evs = [OutgoingEvent(id=f"j{i}", expect="", image=b) for i, b in enumerate(jpegs)]
    evs += [OutgoingEvent(id="png", expect="", image=png), OutgoingEvent(id="cmyk", expect="", image=cmyk.getvalue()),
            OutgoingEvent(id="truncated", expect="", image=jpegs[0][: len(jpegs[0]) // 2]),
            OutgoingEvent(id="garbage", expect="", image=b"\xff\xd8\xff\xe0" + b"\x00" * 64),
            OutgoingEvent(id="bomb", expect="", image=jpegs[3])]  # over the pixel cap below
    return [e.record() for e in evs]


def _run(model_dir, backend: str, device_decode: bool) -> dict:
    from kafka.structs import TopicPartition

    from moderator.worker import Worker

    s = WorkerSettings(model_dir=model_dir, policy=DEMO_POLICY_PATH, encoder_backend=backend, torch_device="cpu",
                       redis_url=None, policy_reload_interval_s=0, max_batch=16, max_wait_ms=5, jpeg_draft=False,
                       max_pixels=640 * 480 - 1, log_json=False, http_port=0)
    worker = Worker(s)
    sink = MemorySink(keep=True)
    worker.pipeline.publisher = sink
    if device_decode:  # what torch on CUDA does, here with the CPU decoder and CPU tensors
        from moderator.encode.device_preprocess import DeviceJpegPreprocessor

        worker.pipeline.device_jpeg = DeviceJpegPreprocessor(worker.encoder.model_dir.manifest.preprocess, "cpu")
    worker.tracker.assign([TopicPartition("bench.images", 0)])
    worker.stages.start()
    records = _events()
    _feed_memory(worker, records, 1, None, 100)
    assert worker.tracker.wait_drained(60), "not every input was acknowledged"
    worker.stages.close()
    worker.stages.join(10)
    worker.stages.shutdown()
    out = {}
    for o in sink.kept:
        if hasattr(o, "reason"):
            out[o.event_id] = ("dead", o.reason)
        else:
            out[o.event_id] = ("decided", {c.id: c.score for c in o.categories}, o.image_sha256)
    assert len(out) == len(records)
    return out, worker.stats.snapshot()["stage_seconds"]


def test_torch_backend_and_device_decode_match_onnx(random_model_dir):
    onnx, _ = _run(random_model_dir, "onnx", False)
    torch_cpu, _ = _run(random_model_dir, "torch", False)
    device, stages = _run(random_model_dir, "torch", True)
    assert stages["gpu_decode"] > 0  # the JPEGs really took the device path
    for name in ("truncated", "garbage", "bomb"):
        assert onnx[name][0] == "dead"
        assert torch_cpu[name] == device[name] == onnx[name], name  # same reason whichever path
    assert onnx["bomb"][1] == "decompression_bomb"
    decided = {eid: v for eid, v in onnx.items() if v[0] == "decided"}
    assert set(decided) == {"j0", "j1", "j2", "png", "cmyk"}
    for eid, (_, scores, sha) in decided.items():
        for other in (torch_cpu, device):
            assert other[eid][0] == "decided" and other[eid][2] == sha
            for cid, score in scores.items():
                assert other[eid][1][cid] == pytest.approx(score, abs=2e-3), (eid, cid)


def test_explicit_cuda_without_a_gpu_is_a_clear_error(random_model_dir):
    import torch

    from moderator.encode import ModelDirectory
    from moderator.encode.factory import TorchOptions, open_image_encoder

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="needs CUDA"):
        open_image_encoder(ModelDirectory(random_model_dir), "torch", torch=TorchOptions(device="cuda"))
    enc = open_image_encoder(ModelDirectory(random_model_dir), "torch", torch=TorchOptions(device="auto"))
    assert enc.runtime_info()["device"] == "cpu" and enc.device_jpeg is None  # no GPU decode on the CPU
    with pytest.raises(ModelError, match="unknown encoder backend"):
        open_image_encoder(ModelDirectory(random_model_dir), "tensorflow")


def test_onnx_options_come_from_worker_settings(tmp_path):
    from moderator.encode.onnx_backend import provider_options
    from moderator.worker.app import ort_options

    s = WorkerSettings(ort_providers="TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider",
                       ort_threads=3, gpu_device_id=1, ort_trt_engine_cache_dir=str(tmp_path / "trt"),
                       ort_trt_fp16=True, ort_io_binding=False)
    o = ort_options(s)
    assert o.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert (o.intra_op_threads, o.device_id, o.io_binding) == (3, 1, False)
    trt, cuda, cpu = provider_options(o.providers, o)
    assert trt == {"device_id": "1", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                   "trt_engine_cache_path": str(tmp_path / "trt"), "trt_timing_cache_enable": "True",
                   "trt_timing_cache_path": str(tmp_path / "trt")}
    assert cuda == {"device_id": "1"} and cpu == {}


def test_io_binding_gives_the_plain_run_result(random_model_dir):
    from moderator.encode import ImageEncoder

    enc = ImageEncoder(random_model_dir)
    assert enc.io_binding is False  # CPU provider: nothing to bind
    h, w = enc.preprocessor.image_size
    x = np.random.default_rng(0).standard_normal((3, 3, h, w)).astype(np.float32)
    bound = enc._run_bound(x, "cpu")
    plain = enc.session.run([enc.spec.output_name], {enc.spec.input_name: x})[0]
    np.testing.assert_allclose(bound, plain, rtol=1e-6, atol=1e-6)


def test_worker_reports_its_backend(random_model_dir):
    from prometheus_client import REGISTRY

    from moderator.worker import Worker

    Worker(WorkerSettings(model_dir=random_model_dir, policy=DEMO_POLICY_PATH, encoder_backend="torch",
                          torch_device="cpu", redis_url=None, policy_reload_interval_s=0, log_json=False))
    labels = next(s.labels for m in REGISTRY.collect() if m.name == "moderator_model" for s in m.samples)
    assert labels["backend"] == "torch" and labels["device"] == "cpu"


def test_gil_switch_interval_is_shortened_only_for_a_gpu_encoder():
    # On an H100 the encode thread, which gives the GIL up at every GPU call, waited up to
    # Python's 5 ms for it each time behind the parsing threads: 400 -> 700 decisions/s at 0.5 ms.
    from moderator.worker.app import gil_switch_interval_s

    s = WorkerSettings(gil_switch_interval_ms=0)  # auto
    assert gil_switch_interval_s(s, {"device": "cpu"}) is None
    assert gil_switch_interval_s(s, {"providers": ["CPUExecutionProvider"]}) is None
    assert gil_switch_interval_s(s, {"device": "cuda:0"}) == 0.0005
    assert gil_switch_interval_s(s, {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}) == 0.0005
    assert gil_switch_interval_s(WorkerSettings(gil_switch_interval_ms=2), {"device": "cpu"}) == 0.002
    with pytest.raises(ValueError):
        WorkerSettings(gil_switch_interval_ms=-1)
