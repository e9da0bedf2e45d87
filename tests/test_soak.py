"""A short soak: the worker's RSS must level off under a steady mixed load (``moderator
bench-soak`` runs the same for minutes; README "Benchmarks" has a 5-minute figure)."""

from moderator.demo import DEMO_POLICY
from moderator.worker.soak import soak, soak_events

GROWTH_BOUND_MB = 12.0  # last third vs middle third of the run; measured 0.0 over 60 s here


def test_the_soak_mix_has_every_kind_of_event():
    evs = soak_events(220, malformed_every=10)
    assert len(evs) == 220
    bad = [e for e in evs if e.expect.startswith("dead_letter:")]
    assert 15 <= len(bad) <= 25 and len({e.expect for e in bad}) >= 5
    images = [e.image for e in evs if e.image is not None and not e.expect.startswith("dead_letter:")]
    assert len(set(images)) < len(images)  # re-sent images: image-cache hits


def test_rss_levels_off_under_steady_mixed_load(random_model_dir, kafka_bootstrap, redis_url, tmp_path):
    r = soak(random_model_dir, DEMO_POLICY, seconds=36, rate=40, bootstrap_servers=kafka_bootstrap,
             redis_url=redis_url, workdir=tmp_path, log=lambda m: None)
    print(f"\nsoak: {r['events']} events in {r['seconds']} s, RSS {r['rss_mb_at_start']} -> "
          f"{r['rss_mb_middle_third_mean']} -> {r['rss_mb_last_third_mean']} MiB (max {r['rss_mb_max']}), "
          f"threads {r['samples'][0][2]} -> {r['samples'][-1][2]}")
    assert r["worker_exit_status"] == 0
    assert r["decisions"] + r["dead_letters"] == r["events"] and r["dead_letters"] > 0
    assert r["growth_mb_last_vs_middle_third"] <= GROWTH_BOUND_MB, "seconds:MiB/threads " + " ".join(
        f"{t:g}:{mb:g}/{threads}" for t, mb, threads in r["samples"])
