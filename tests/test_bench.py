"""The benchmark commands' mechanics (never their speed): they run, count every event,
report each figure they promise, and the JPEG draft path decodes what it should."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moderator.decode import decode_image
from moderator.worker.bench import bench_worker, photo_like_jpeg, summarize_collapsed

from moderator.demo import DEMO_POLICY as DEMO_POLICY_PATH


def test_memory_source_runs_the_whole_pipeline(random_model_dir, tmp_path):
    r = bench_worker(random_model_dir, DEMO_POLICY_PATH, source="memory", events=400, image="png", size=(40, 40),
                     max_batch=8, max_wait_ms=5, encoder_seconds=0.2, latency=True, latency_events=30,
                     profile=tmp_path / "profile.txt", log=lambda m: None)
    assert r["decisions_in_sink"] == 430 and r["dead_letters"] == 0  # both phases, every event decided
    for key in ("worker_decisions_per_s", "encoder_images_per_s", "encoder_with_preprocess_images_per_s",
                "ratio_worker_to_encoder", "ratio_worker_to_encoder_with_preprocess", "cpu_seconds_per_event_ms"):
        assert r[key] > 0, key
    assert {"parse", "hash_cache", "decode", "encode", "score", "publish_call"} <= set(r["stage_ms_per_event"])
    assert 1 <= r["mean_batch_size"] <= 8  # max_batch
    assert {"prepare", "encode"} <= set(r["thread_cpu_ms_per_event"])  # 400 events: many kernel ticks each
    lat = r["latency_at_half_rate"]
    assert lat["n"] == 30 and 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    # its parts, each measured per input: together they are the whole (p50s of parts need not add up)
    assert list(lat["stages"]) == ["prepare", "wait_for_encoder", "encode_decide_publish", "ack"]
    assert all(0 <= v["p50_ms"] <= v["p99_ms"] <= lat["max_ms"] for v in lat["stages"].values())
    assert lat["stages"]["encode_decide_publish"]["p50_ms"] > 0
    prof = r["profile"]  # py-spy sampled this process's threads while the pipeline ran
    assert prof["samples"] > 0 and (tmp_path / "profile.txt").stat().st_size > 0
    assert {"prepare", "encode"} & set(prof["threads"])


def test_jpeg_events_take_the_draft_path_and_are_all_decided(random_model_dir):
    r = bench_worker(random_model_dir, DEMO_POLICY_PATH, source="memory", events=12, image="jpeg",
                     size=(320, 240), max_batch=4, max_wait_ms=5, encoder_seconds=0.1, log=lambda m: None)
    assert r["decisions_in_sink"] == 12 and r["image"].startswith("320x240 JPEG")


def test_compare_policy_runs_both_and_reports_the_pdq_stage(random_model_dir, tmp_path):
    import pdqhash  # noqa: F401 - the pdq extra is part of the test install: fail, never skip
    import yaml

    from moderator.worker.bench import bench_policies

    doc = yaml.safe_load(DEMO_POLICY_PATH.read_text())
    doc["pdq_banks"] = [{"name": "tx", "path": "hashes.csv"}]
    (tmp_path / "hashes.csv").write_text("f" * 64 + ",x\n")
    (tmp_path / "pdq.yaml").write_text(yaml.safe_dump(doc))
    r = bench_policies(random_model_dir, DEMO_POLICY_PATH, tmp_path / "pdq.yaml", rounds=1, events=20,
                       image="png", size=(64, 64), max_batch=4, max_wait_ms=5, encoder_seconds=0.05,
                       log=lambda m: None)
    assert len(r["decisions_per_s"]["policy"]) == len(r["decisions_per_s"]["other"]) == 1
    assert r["ratio_other_to_policy"] > 0
    assert "pdq" in r["stages_last_round"]["other"] and "pdq" not in r["stages_last_round"]["policy"]


def test_processes_share_the_events_start_together_and_add_up(random_model_dir):
    """--processes N: N worker processes, each events/N, one aggregate rate over all of them."""
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "moderator.cli", "bench-worker", "--model", str(random_model_dir),
            "--policy", str(DEMO_POLICY_PATH), "--source", "memory", "--events", "60", "--size", "40",
            "--max-batch", "8", "--max-wait-ms", "5", "--set", "ort_threads=1"]
    out = subprocess.run([*args, "--processes", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[0])
    assert r["processes"] == 2 and r["events"] == r["decisions_in_sink"] == 60 and r["dead_letters"] == 0
    assert len(r["per_process_decisions_per_s"]) == 2 and r["worker_decisions_per_s"] > 0
    # one rate over the union of the measured windows: never more than the two side by side
    assert r["worker_decisions_per_s"] <= sum(r["per_process_decisions_per_s"]) * 1.001
    assert 0 <= r["start_spread_s"] < 5 and {"decode", "encode"} <= set(r["stage_ms_per_event"])
    refused = subprocess.run([*args, "--processes", "2", "--latency"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--processes runs without --latency" in refused.stderr


def test_run_processes_through_kafka_measures_one_and_n_processes(random_model_dir, kafka_bootstrap):
    """--processes N --source kafka: the real `moderator run`, as 1 and as N processes, every
    event decided by each, rates counted after the producer finished."""
    from moderator.worker.bench import bench_run_processes

    r = bench_run_processes(random_model_dir, DEMO_POLICY_PATH, processes=2, events=600, size=(40, 40),
                            max_batch=8, max_wait_ms=5, partitions=2, encoder_seconds=0.1,
                            bootstrap_servers=kafka_bootstrap, overrides={"ort_threads": 1}, log=lambda m: None)
    assert set(r["runs"]) == {"1", "2"}
    for run in r["runs"].values():
        assert run["exit_status"] == 0 and run["decisions"] == 600, run
        assert 0 < run["decisions_measured"] <= 600 and run["worker_decisions_per_s"] > 0
        assert run["ratio_worker_to_encoder_with_preprocess"] > 0 and run["cpu_seconds_per_event_ms"] > 0
    assert r["ratio_processes_to_one"] > 0


@pytest.mark.parametrize("generator", ["kafka-python", "librdkafka"])
def test_kafka_source_with_latency_counts_every_event_and_every_clock(random_model_dir, kafka_bootstrap, generator):
    """--source kafka --latency: the pre-loaded events and the paced ones all decided on the
    topic; both latency clocks, the CPU per thread and the load generator's CPU reported."""
    r = bench_worker(random_model_dir, DEMO_POLICY_PATH, source="kafka", events=40, image="png", size=(40, 40),
                     max_batch=8, max_wait_ms=5, encoder_seconds=0.1, bootstrap_servers=kafka_bootstrap,
                     latency=True, latency_events=20, latency_rate=40, overrides={"ort_threads": 1},
                     load_generator=generator, log=lambda m: None)
    assert r["decisions_on_topic"] == 60 and r["dead_letters"] == 0
    # (40 small events may cost a thread less than the kernel's 10 ms tick: no names asserted here)
    assert r["thread_cpu_ms_per_event"] and all(v > 0 for v in r["thread_cpu_ms_per_event"].values())
    lat = r["latency_at_half_rate"]
    assert lat["n"] == 20 and lat["created_to_acked"]["n"] == 20
    # created_at is stamped before the record is sent, so each input's created clock reads at
    # least its consume clock (less the 1 ms the ISO timestamp truncates)
    assert lat["created_to_acked"]["p50_ms"] >= lat["p50_ms"] - 1
    assert lat["load_generator_cpu_ms_per_event"] > 0 and lat["cpu_seconds_per_event_ms"] > 0
    # paced, not as fast as it goes (the lower bound leaves room for a first send waiting on metadata)
    assert 0.25 * 40 < lat["load_generator_rate_per_s"] < 1.5 * 40
    assert 1 <= lat["mean_batch_size"] <= 8
    assert lat["load_generator"] == generator  # as the generator process reports the client it used


def test_librdkafka_client_sends_every_envelope_as_the_worker_reads_it(kafka_bootstrap, topic_factory, read_records):
    """produce(client="librdkafka"): the benchmarks' cheaper load generator writes the same
    records as kafka-python (key, headers, value), each acknowledged, partitioned by key."""
    from kafka.partitioner.default import murmur2

    from moderator.ingest import parse_record
    from moderator.produce import ENVELOPES, produce, synthetic_events

    events = list(synthetic_events(3 * len(ENVELOPES), seed=5, size=32, envelopes=ENVELOPES, id_prefix="rdk"))
    topic = topic_factory(3)
    ready = []
    report = produce(kafka_bootstrap, topic, events, rate=200, client="librdkafka", on_ready=lambda: ready.append(1))
    assert ready == [1] and report.sent == len(events) and set(report.expected) == {e.id for e in events}
    # closed: librdkafka's own threads ("rdk:main", "rdk:broker...") are gone, not left retrying
    assert not [name for name in _thread_names() if name.startswith("rdk:")]
    records = read_records([topic], len(events), timeout_s=60)
    assert len(records) == len(events), "every event acknowledged and on the topic, none twice"
    by_id = {}
    for r in records:
        ev = parse_record(r.value, r.key, r.headers)
        by_id[ev.id] = (ev, r)
    for e in events:
        ev, r = by_id[e.id]
        stamp = None if e.envelope == "raw" else pytest.approx(report.sent_at[e.id], abs=0.001)  # raw has no clock
        assert ev.data == e.image and ev.created_at == stamp, e.envelope
        assert r.key == e.id.encode()
        # the partition kafka-python (and the Java client) would pick for the key: murmur2
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 3, e.id


def _thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return names


def test_librdkafka_client_holds_its_producer_id_before_the_first_send(kafka_bootstrap, topic_factory):
    """librdkafka gets its idempotent producer id in the background and holds records until then
    (~0.5 s when its first request finds no connection): the sender waits for it up front."""
    from moderator.produce import _LibrdkafkaSender

    sender = _LibrdkafkaSender(kafka_bootstrap, topic_factory(1), None)
    try:
        assert sender.ready  # the constructor returned only once its stats said so
    finally:
        sender.close()
    # what it waits for, in librdkafka's own stats JSON (its "eos" block)
    sender.ready = False
    sender._stats('{"name": "p", "eos": {"idemp_state": "WaitTransport", "idemp_stateage": 498}}')
    assert not sender.ready
    sender._stats('{"name": "p", "eos": {"idemp_state": "Assigned", "producer_id": 96}}')
    assert sender.ready


def test_librdkafka_client_refuses_what_it_cannot_do(monkeypatch):
    import sys

    from moderator.errors import MissingDependency
    from moderator.produce import produce

    with pytest.raises(ValueError, match="client is one of"):
        produce("127.0.0.1:9", "t", [], client="rdkafka")
    with pytest.raises(ValueError, match="no TLS/SASL"):  # before any connection
        produce("127.0.0.1:9", "t", [], client="librdkafka", security={"security_protocol": "SSL"})
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # as if not installed
    with pytest.raises(MissingDependency, match="confluent-kafka"):
        produce("127.0.0.1:9", "t", [], client="librdkafka")
    with pytest.raises(MissingDependency, match="confluent-kafka"):  # at once, before minutes of measuring
        bench_worker("m", DEMO_POLICY_PATH, source="kafka", latency=True, load_generator="librdkafka",
                     log=lambda m: None)


def test_cpu_by_label_groups_pool_threads_by_name():
    import threading
    import time

    from moderator.worker.bench import thread_cpu_share
    from moderator.worker.threadcpu import cpu_by_label

    def spin() -> None:
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.3:
            pass

    before = cpu_by_label()
    held = threading.Event()

    def spin_then_hold() -> None:  # alive when sampled: an ended thread's time is gone from /proc
        spin()
        held.wait(10)

    threads = [threading.Thread(target=spin_then_hold, name=f"spinner_{i}") for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    deadline = time.monotonic() + 30
    while cpu_by_label().get("spinner", 0) < 0.55 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = cpu_by_label()
    held.set()
    for t in threads:
        t.join()
    assert "spinner_0" not in after and after["spinner"] >= 0.55  # both pool threads, one name
    share = thread_cpu_share(before, after, events=10)
    assert share["spinner"] >= 55  # ms per event over 10 events


def test_summarize_collapsed_counts_threads_and_leaves():
    text = ("thread (1): encode;a (x.py:1);Session.run (o.py:2) 30\n"
            "thread (2): prepare_0;a (x.py:1);ImageFile.load (i.py:3) 50\n"
            "thread (3): prepare_3;a (x.py:1);ImageFile.load (i.py:3) 20\n")
    s = summarize_collapsed(text)
    assert s["samples"] == 100
    assert s["threads"] == {"prepare": 0.7, "encode": 0.3}
    assert s["top_leaf_frames"] == {"ImageFile.load": 0.7, "Session.run": 0.3}


# --- JPEG draft in decode_image --------------------------------------------------------------------


def _jpeg(w: int, h: int) -> bytes:
    data, _ = photo_like_jpeg(np.random.default_rng(0), w, h)
    return data


def test_draft_downscales_large_jpegs_in_the_dct_domain_never_below_the_target():
    big = _jpeg(1024, 768)
    full, drafted = decode_image(big), decode_image(big, draft=(224, 224))
    assert full.image.size == (1024, 768)
    assert drafted.image.size == (512, 384)  # 1/4 would be 256x192 < 224 on one side
    assert drafted.original_size == (1024, 768) and drafted.sha256 == full.sha256
    assert decode_image(big, draft=(64, 64)).image.size == (128, 96)  # 1/8
    assert decode_image(_jpeg(300, 300), draft=(224, 224)).image.size == (300, 300)  # < 2x: untouched
    png = io.BytesIO()
    Image.new("RGB", (1024, 768), "red").save(png, "PNG")
    assert decode_image(png.getvalue(), draft=(64, 64)).image.size == (1024, 768)  # JPEG only


def test_draft_changes_the_model_input_only_slightly(random_model_dir):
    from moderator.encode import ImageEncoder

    enc = ImageEncoder(random_model_dir)
    h, w = enc.preprocessor.image_size
    big = _jpeg(1024, 768)
    a = np.asarray(enc.preprocessor.resize_and_crop(decode_image(big).image), dtype=np.int16)
    b = np.asarray(enc.preprocessor.resize_and_crop(decode_image(big, draft=(w, h)).image), dtype=np.int16)
    diff = np.abs(a - b)
    # measured: mean ~1-2 grey levels; the DCT-domain and bicubic reductions differ at edges
    assert diff.mean() < 4 and diff.max() < 80
    ea = enc.encode([Image.fromarray(a.astype(np.uint8))])
    eb = enc.encode([Image.fromarray(b.astype(np.uint8))])
    assert float((ea @ eb.T)[0, 0]) > 0.98


def test_a_cached_sha256_is_used_not_recomputed():
    data = _jpeg(64, 48)
    assert decode_image(data, sha256="f" * 64).sha256 == "f" * 64


@pytest.mark.parametrize("bad", [b"", b"\xff\xd8\xff\xe0 not really", b"\xff\xd8" + b"\x00" * 30])
def test_draft_keeps_bad_input_errors_named(bad):
    from moderator.errors import InputError

    with pytest.raises(InputError) as plain:
        decode_image(bad)
    with pytest.raises(InputError) as drafted:
        decode_image(bad, draft=(64, 64))
    assert plain.value.reason == drafted.value.reason


def test_gpu_worker_script_runs_its_cpu_fallback(tmp_path):
    """deploy/bench/gpu-worker.sh is for a GPU host; without CUDA it must still run end to end
    (torch backend, CPU decode) -- with a tiny model and a few events to keep it quick."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch = pytest.importorskip("torch")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "MODEL_NAME": "moderator-tiny", "EVENTS": "24",
           "SIZE": "320x240", "MAX_BATCH": "8", "ENCODER_SECONDS": "0.2", "ANCHOR": "skip"}
    out = subprocess.run(["bash", str(repo / "deploy/bench/gpu-worker.sh"), str(tmp_path)], env=env, cwd=repo,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = ["gpu-decode", "gpu-decode-raw"] if torch.cuda.is_available() else ["cpu-decode"]
    for name in runs:
        r = json.loads((tmp_path / f"{name}.json").read_text().splitlines()[-1])
        assert r["backend"] == "torch" and r["decisions_in_sink"] == 48 and r["dead_letters"] == 0
        assert r["latency_at_half_rate"]["n"] == 24
    assert "decisions/s" in out.stdout and runs[-1] in out.stdout.splitlines()[-1]


def test_gpu_lease_script_runs_its_cpu_path(tmp_path):
    """deploy/bench/gpu-lease.sh is the one prepared call for a lent GPU machine; here, without
    CUDA, it must run every step on the CPU (no anchors there) and write its files."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "ARCH": "moderator-tiny", "EVENTS": "24", "LATENCY_EVENTS": "24",
           "ENCODER_SECONDS": "0.2", "WHEELS": str(tmp_path / "no-wheels"), "ANCHOR": str(tmp_path / "none.py"),
           "OUT": str(tmp_path / "out"), "PROFILE_IF_BEFORE_S": "0", "PROCESSES": "2"}
    out = subprocess.run(["bash", str(repo / "deploy/bench/gpu-lease.sh")], env=env, cwd=repo,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name, what in (("worker-json", "base64 in json"), ("worker-raw", "raw envelope")):
        r = json.loads((tmp_path / "out" / f"{name}.json").read_text().splitlines()[0])
        assert r["decisions_in_sink"] == 48 and r["dead_letters"] == 0 and what in r["image"]
    procs = json.loads((tmp_path / "out" / "worker-raw-procs.json").read_text().splitlines()[0])
    assert procs["processes"] == 2 and procs["decisions_in_sink"] == 48 and procs["dead_letters"] == 0
    assert json.loads((tmp_path / "out" / "selfcheck.json").read_text())["ok"] is True
    assert "done" in (tmp_path / "out" / "lease-log.txt").read_text()
