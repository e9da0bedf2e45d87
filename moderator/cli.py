"""``moderator``: one command, one subcommand per job. A thin face over the library.

Each subcommand parses its arguments, calls one library function and prints;
heavy imports (torch, onnxruntime) happen inside the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from moderator.errors import ModeratorError


def _cmd_export(a: argparse.Namespace) -> int:
    from moderator.errors import ModelError
    from moderator.model.export import EXPORT_STEPS, export_model, load_model
    from moderator.progress import progress_bar

    def load():
        return load_model(a.model, pretrained=a.pretrained, checkpoint=a.checkpoint, config=a.config, seed=a.seed)

    if a.quantize is None:
        if a.calibration_dir is not None:
            raise ModelError("--calibration-dir is only used with --quantize int8")
        with progress_bar(len(EXPORT_STEPS), "export", "step") as bar:
            def step(name: str) -> None:
                bar.set_description_str(f"export: {name}")
                bar.update(1)

            md = export_model(load(), a.out, precision=a.precision, overwrite=a.overwrite, progress=step)
    else:
        from moderator.model.quantize import export_quantized

        md = export_quantized(load, a.out, a.calibration_dir, precision=a.precision,
                              calibration_images=a.calibration_images, reduce_range=not a.full_range,
                              overwrite=a.overwrite)
    q = md.manifest.quantization
    print(json.dumps({**md.describe(), **({"quantization": q.model_dump()} if q else {})}, indent=2))
    return 0


def _cmd_synth(a: argparse.Namespace) -> int:
    from moderator.model.synth import write_dataset
    from moderator.progress import progress_bar

    splits: dict[str, dict] = {}
    for split, n in (("train", a.train), ("heldout", a.heldout)):
        if n:
            with progress_bar(n, f"synth {split}") as bar:
                jsonl = write_dataset(a.out, n, a.seed, split, a.size, progress=bar.update)
            splits[split] = {"images": n, "jsonl": str(jsonl)}
            if a.policy_labels:
                from moderator.model.demo_labels import write_policy_labels

                splits[split]["policy_labels"] = str(write_policy_labels(jsonl, a.out / f"{split}.policy-labels.jsonl"))
    if a.json:
        print(json.dumps({"out": str(a.out), "seed": a.seed, "size": a.size, "splits": splits}))
    else:
        for entry in splits.values():
            print(entry["jsonl"])
            if "policy_labels" in entry:
                print(entry["policy_labels"])
    return 0


def _cmd_finetune(a: argparse.Namespace) -> int:
    from moderator.model.finetune import FinetuneConfig, finetune

    r = finetune(FinetuneConfig(
        data=a.data, out=a.out, model=a.model, config=a.config, pretrained=a.pretrained,
        init_checkpoint=a.init_checkpoint, loss=a.loss, steps=a.steps, batch_size=a.batch_size,
        lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        freeze_towers=a.freeze_towers, seed=a.seed, threads=a.threads,
    ))
    if a.json:
        print(json.dumps({"steps": r.steps, "seconds": round(r.seconds, 3), "final_loss": r.final_loss,
                          "logit_scale": r.logit_scale, "checkpoint": str(r.out)}))
        return 0
    print(f"trained {r.steps} steps in {r.seconds:.1f}s, final loss {r.final_loss:.4f}, "
          f"logit scale {r.logit_scale:.2f}; checkpoint: {r.out}")
    print(f"export it with: moderator export --checkpoint {r.out} --out MODEL_DIR")
    return 0


def _cmd_demo_model(a: argparse.Namespace) -> int:
    from moderator.model.demo import ensure_demo_model

    d = ensure_demo_model(a.seed, force=a.force)
    r = d.report
    labels = comparison = None
    if a.write_labels:
        from moderator.model.demo_labels import write_policy_labels

        labels = write_policy_labels(d.heldout_jsonl, a.write_labels)
    if a.compare_templates:
        from moderator.model.demo import zero_shot_accuracy
        from moderator.model.synth import ZERO_SHOT_TEMPLATES

        comparison = {**{t: zero_shot_accuracy(d.model_dir, d.heldout_jsonl, (t,)) for t in ZERO_SHOT_TEMPLATES},
                      "ensemble": zero_shot_accuracy(d.model_dir, d.heldout_jsonl)}
    if a.json:
        out = {"model_dir": str(d.model_dir), "heldout_jsonl": str(d.heldout_jsonl), **r}
        if labels is not None:
            out["policy_labels"] = str(labels)
        if comparison is not None:
            out["template_comparison"] = comparison
        print(json.dumps(out, default=str))
        return 0
    print(f"demo model: {d.model_dir}")
    print(f"trained on {r['train_images']} synthetic images in {r['train_seconds']}s "
          f"({r['train']['steps']} steps, batch {r['train']['batch_size']}); "
          f"held-out set: {r['n']} images, worst class {r['worst_class_accuracy']:.2f}")
    if r["errors"]:
        print("most frequent confusions: " + ", ".join(f"{k} ({v})" for k, v in list(r["errors"].items())[:5]))
    print(f"held-out zero-shot accuracy: {r['accuracy']:.2f}")
    if labels is not None:
        print(f"labels for the demo policy: {labels}")
    if comparison is not None:
        ensemble = comparison.pop("ensemble")
        for t, acc in comparison.items():
            print(f"  single template {t!r}: {acc['accuracy']:.4f} (worst class {acc['worst_class_accuracy']:.2f})")
        print(f"  ensemble of {len(comparison)}: {ensemble['accuracy']:.4f} "
              f"(worst class {ensemble['worst_class_accuracy']:.2f})")
    return 0


def _cmd_bench_encoder(a: argparse.Namespace) -> int:
    from moderator.encode.bench import bench_encoders

    for row in bench_encoders(a.model_dir, a.batch_sizes, a.seconds, a.backends):
        print(json.dumps(row))
    return 0


def _redis_options(url: str | None) -> dict:
    """User, password and TLS files for ``--redis-url`` from the worker's MODERATOR_REDIS_* variables."""
    if not url:
        return {}
    from moderator.config import RedisClientSettings

    return RedisClientSettings(redis_url=url).redis_options()


def _cmd_classify(a: argparse.Namespace) -> int:
    from moderator.classify import Classifier, expand_paths
    from moderator.decode import DecodeLimits

    clf = Classifier(a.model, a.policy, redis_url=a.redis_url, redis_options=_redis_options(a.redis_url),
                     limits=DecodeLimits(max_bytes=a.max_bytes, max_pixels=a.max_pixels))
    paths = expand_paths(a.images)
    if not paths:
        print("moderator classify: no image files found", file=sys.stderr)
        return 2
    failures = 0
    if not a.json:
        print(f"{'action':<9} {'top category':<22} {'score':>7}  file")
    for r in clf.classify_files(paths):
        if r.error is not None:
            failures += 1
            if a.json:
                print(json.dumps({"path": str(r.path), "error": {"reason": r.error.reason, "message": str(r.error)}}))
            else:
                print(f"{'ERROR':<9} {r.error.reason:<22} {'':>7}  {r.path}: {r.error}")
            continue
        d = r.decision
        if a.json:
            print(d.model_dump_json())
        else:
            top = next((c for c in d.categories if c.id == d.top_category), None)
            print(f"{d.action:<9} {d.top_category or '-':<22} {top.score if top else 0:>7.3f}  {r.path}")
    if not a.json:
        p = clf.engine.policy
        print(f"policy {p.version} ({p.loaded.sha256[:12]}), model {clf.model_dir.manifest.architecture} "
              f"({clf.model_dir.model_sha256[:12]}); {failures} file(s) failed")
    return 1 if failures else 0


def _cmd_evaluate_policy(a: argparse.Namespace) -> int:
    from moderator.classify import Classifier
    from moderator.decide.evaluate import confusion, format_confusion, read_labelled
    from moderator.progress import progress_bar

    clf = Classifier(a.model, a.policy, redis_url=a.redis_url, redis_options=_redis_options(a.redis_url))
    rows = read_labelled(a.data)
    with progress_bar(len(rows), "evaluate") as bar:
        matrix = confusion(clf, rows, progress=bar.update)
    if a.json:
        print(json.dumps({"policy_version": clf.engine.policy.version, "data": str(a.data),
                          "confusion": {label: dict(c) for label, c in sorted(matrix.items())}}))
    else:
        print(f"policy {clf.engine.policy.version} on {a.data}: rows are labels, columns actions")
        print(format_confusion(matrix))
    errors = sum(c.get("error", 0) for c in matrix.values())
    return 1 if errors else 0


def _cmd_run(a: argparse.Namespace) -> int:
    from moderator.settings_cli import settings_from
    from moderator.worker import run_worker

    return run_worker(settings_from(a.settings_source, a), argv=a.argv)  # main() reports invalid settings


def _cmd_produce(a: argparse.Namespace) -> int:
    from moderator import produce as prod
    from moderator.config import KafkaClientSettings
    from moderator.ingest.access import check_kafka_access

    envelopes = tuple(a.envelopes.split(","))
    unknown = [e for e in envelopes if e not in prod.ENVELOPES]
    if unknown:  # before any connection: a typo is a usage error, not a failure minutes later
        print(f"moderator produce: --envelopes: unknown {', '.join(map(repr, unknown))}; choose from "
              f"{', '.join(prod.ENVELOPES)}", file=sys.stderr)
        return 2
    # the worker's MODERATOR_KAFKA_* variables: bootstrap servers, TLS, SASL (main() reports invalid ones)
    kafka = KafkaClientSettings(**({"kafka_bootstrap_servers": a.bootstrap_servers} if a.bootstrap_servers else {}))
    bootstrap, security = kafka.kafka_bootstrap_servers, kafka.kafka_security()
    check_kafka_access(bootstrap, security, timeout_s=kafka.kafka_startup_timeout_s,
                       client_id="moderator-produce-check")

    if a.dir:
        good = prod.directory_events(a.dir, envelopes=envelopes, id_prefix=a.id_prefix or "file")
    else:
        good = prod.synthetic_events(a.synthetic, a.seed, size=a.size, envelopes=envelopes,
                                     duplicate_rate=a.duplicates, id_prefix=a.id_prefix or "synth")
    bad = prod.malformed_events(f"{a.id_prefix or 'bad'}-malformed", a.seed)[: a.malformed] if a.malformed else []
    stream = prod.interleave(good, bad, a.malformed_every)
    if a.create_topic:
        prod.ensure_topics(bootstrap, {a.topic: a.create_topic}, security)
    from moderator.progress import progress_bar

    total = a.synthetic if a.synthetic and not bad else None  # interleave may use fewer malformed ones
    with progress_bar(total, f"produce {a.topic}", "event") as bar:
        def counted(events):
            for ev in events:
                yield ev
                bar.update(1)

        report = prod.produce(bootstrap, a.topic, counted(stream), rate=a.rate, security=security)
    if a.manifest:
        with open(a.manifest, "w") as f:
            for event_id, expect in report.expected.items():
                f.write(json.dumps({"id": event_id, "expect": expect, "sent_at": report.sent_at[event_id]}) + "\n")
    print(json.dumps({"topic": a.topic, "sent": report.sent, "seconds": round(report.seconds, 3),
                      "events_per_s": round(report.rate, 1), "bytes": report.bytes,
                      "malformed": len(bad), "manifest": str(a.manifest) if a.manifest else None}))
    return 0


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        return int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size is N or WxH, not {text!r}") from None


def _usage(message: str) -> int:
    """A usage error found after parsing: say it, exit 2 (``moderator.errors.EXIT_USAGE``)."""
    from moderator.errors import EXIT_USAGE

    print(message, file=sys.stderr)
    return EXIT_USAGE


def _cmd_bench_worker(a: argparse.Namespace) -> int:
    from moderator.worker.bench import bench_worker

    overrides = {"jpeg_draft": a.jpeg_draft, "adaptive_batching": a.adaptive_batching, "gpu_decode": a.gpu_decode,
                 "ort_spin_wait": a.ort_spin_wait}
    if a.prepare_workers:
        overrides["prepare_workers"] = a.prepare_workers
    for kv in a.set or ():
        key, sep, value = kv.partition("=")
        if not sep:
            return _usage(f"moderator bench-worker: --set takes SETTING=VALUE, not {kv!r}")
        overrides[key.strip().lower().removeprefix("moderator_")] = value
    if a.load_generator != "kafka-python" and (not (a.latency and a.source == "kafka") or a.processes > 1
                                               or a.compare_guarantees or a.compare_policy):
        return _usage("moderator bench-worker: --load-generator is the latency phase's producer: it needs "
                      "--latency --source kafka (and no --processes or --compare-*)")
    if a.processes > 1:
        return _bench_worker_processes(a, overrides)
    if a.compare_guarantees:
        from moderator.worker.bench import bench_guarantees

        if a.source != "kafka":
            return _usage("moderator bench-worker: --compare-guarantees needs --source kafka")
        r = bench_guarantees(a.model, a.policy, rounds=a.compare_guarantees, events=a.events, image=a.image,
                             size=a.size, envelope=a.envelope, unique_images=a.unique_images, max_batch=a.max_batch,
                             max_wait_ms=a.max_wait_ms, partitions=a.partitions, encoder_seconds=a.encoder_seconds,
                             bootstrap_servers=a.bootstrap_servers, backend=a.backend, overrides=overrides,
                             log=lambda m: print(m, file=sys.stderr))
        print(json.dumps(r))
        print(f"exactly-once {r['median_decisions_per_s']['exactly_once']} decisions/s, at-least-once "
              f"{r['median_decisions_per_s']['at_least_once']} (medians of {r['rounds']} interleaved rounds): "
              f"ratio {r['ratio_exactly_once_to_at_least_once']:.2f}", file=sys.stderr)
        return 0
    if a.compare_policy:
        from moderator.worker.bench import bench_policies

        r = bench_policies(a.model, a.policy, a.compare_policy, rounds=a.rounds, source=a.source, events=a.events,
                           image=a.image, size=a.size, envelope=a.envelope, unique_images=a.unique_images,
                           max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, partitions=a.partitions,
                           encoder_seconds=a.encoder_seconds, bootstrap_servers=a.bootstrap_servers,
                           backend=a.backend, overrides=overrides, log=lambda m: print(m, file=sys.stderr))
        print(json.dumps(r))
        print(f"{a.compare_policy}: {r['median_decisions_per_s']['other']} decisions/s, {a.policy}: "
              f"{r['median_decisions_per_s']['policy']} (medians of {r['rounds']} interleaved rounds): "
              f"ratio {r['ratio_other_to_policy']:.2f}", file=sys.stderr)
        return 0
    r = bench_worker(a.model, a.policy, source=a.source, events=a.events, image=a.image, size=a.size,
                     envelope=a.envelope, unique_images=a.unique_images,
                     max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, partitions=a.partitions,
                     encoder_seconds=a.encoder_seconds, bootstrap_servers=a.bootstrap_servers, backend=a.backend,
                     latency=a.latency, latency_events=a.latency_events, latency_rate=a.latency_rate,
                     load_generator=a.load_generator, seed_loop_model=a.seed_loop_model, profile=a.profile,
                     profile_gil=a.profile_gil, overrides=overrides, start_gate=a.start_gate,
                     log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(r))
    print(f"worker ({a.source}): {r['worker_decisions_per_s']} decisions/s; "
          f"encoder alone: {r['encoder_images_per_s']} images/s "
          f"({r['encoder_with_preprocess_images_per_s']} with preprocessing); "
          f"ratio {r['ratio_worker_to_encoder']:.2f} ({r['ratio_worker_to_encoder_with_preprocess']:.2f})"
          + (f"; x{r['ratio_worker_to_seed_loop']} the seed loop" if "ratio_worker_to_seed_loop" in r else "")
          + (f"; p99 {r['latency_at_half_rate']['p99_ms']} ms at half rate" if "latency_at_half_rate" in r else ""),
          file=sys.stderr)
    return 0


def _bench_worker_processes(a: argparse.Namespace, overrides: dict) -> int:
    from moderator.worker.bench import bench_run_processes, bench_worker_processes

    clashes = [flag for flag, on in (("--latency", a.latency),
                                     ("--profile", a.profile), ("--seed-loop-model", a.seed_loop_model),
                                     ("--compare-guarantees", a.compare_guarantees),
                                     ("--compare-policy", a.compare_policy)) if on]
    if clashes:
        return _usage(f"moderator bench-worker: --processes runs without {clashes[0]}")
    if a.source == "kafka":
        r = bench_run_processes(a.model, a.policy, processes=a.processes, events=a.events, image=a.image,
                                size=a.size, envelope=a.envelope, unique_images=a.unique_images,
                                max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, partitions=a.partitions,
                                encoder_seconds=a.encoder_seconds, bootstrap_servers=a.bootstrap_servers,
                                overrides=overrides, log=lambda m: print(m, file=sys.stderr))
        print(json.dumps(r))
        print(f"moderator run through Kafka: 1 process {r['runs']['1']['worker_decisions_per_s']} decisions/s, "
              f"{a.processes} processes {r['runs'][str(a.processes)]['worker_decisions_per_s']} "
              f"({r['ratio_processes_to_one']}x)", file=sys.stderr)
        return 0
    child_argv = a.argv[a.argv.index("bench-worker") + 1:]  # the parent's own flags; the last of each wins
    r = bench_worker_processes(a.processes, child_argv, events=a.events, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(r))
    print(f"{r['processes']} worker processes (memory): {r['worker_decisions_per_s']} decisions/s together "
          f"(each: {r['per_process_decisions_per_s']})", file=sys.stderr)
    return 0


def _model_or_demo(model: Path | None) -> Path:
    """The model directory given, else the cached demo model (trained on first use)."""
    if model is not None:
        return model
    from moderator.model.demo import ensure_demo_model

    return ensure_demo_model(progress=True).model_dir


def _cmd_bench_draft(a: argparse.Namespace) -> int:
    from moderator.worker.bench import jpeg_draft_effect

    print(json.dumps(jpeg_draft_effect(_model_or_demo(a.model), n=a.n, size=a.size, quality=a.quality)))
    return 0


def _cmd_bench_soak(a: argparse.Namespace) -> int:
    from moderator.worker.soak import soak

    from moderator.resources import DEMO_POLICY

    r = soak(_model_or_demo(a.model), a.policy or DEMO_POLICY, seconds=a.seconds, rate=a.rate, bootstrap_servers=a.bootstrap_servers,
             redis_url=a.redis_url, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(r))
    print(f"RSS {r['rss_mb_at_start']} MiB at start, {r['rss_mb_middle_third_mean']} -> {r['rss_mb_last_third_mean']} "
          f"MiB (middle -> last third of {r['seconds']} s), max {r['rss_mb_max']}", file=sys.stderr)
    return 0 if r["worker_exit_status"] == 0 else 1


def _cmd_demo(a: argparse.Namespace) -> int:
    from moderator.demo import DEMO_POLICY, run_demo

    model, demo_model = a.model, None
    if model is None:
        from moderator.model.demo import ensure_demo_model

        demo_model = ensure_demo_model(progress=True)
        model = demo_model.model_dir
    s = run_demo(model_dir=model, policy=a.policy or DEMO_POLICY, events=a.events, rate=a.rate or None,
                 partitions=a.partitions, hold=a.hold, seed=a.seed,
                 out=(lambda m: print(m, file=sys.stderr)) if a.json else print)
    if a.json:
        import dataclasses

        print(json.dumps({**dataclasses.asdict(s), **({"heldout_accuracy": demo_model.report["accuracy"]}
                                                     if demo_model is not None else {})}, default=str))
    elif demo_model is not None:  # the demo's headline stays the last line
        print(f"held-out zero-shot accuracy: {demo_model.report['accuracy']:.2f}")
    return 0 if s.accounted == s.produced and s.worker_exit == 0 else 1


def _bank_sources(a: argparse.Namespace):
    from moderator import bank_tool

    if a.jsonl is not None:
        return bank_tool.sources_from_jsonl(a.jsonl, a.label, a.source)
    return bank_tool.sources_from_dir(a.images, a.label, a.source)


def _bank_report(a: argparse.Namespace, report) -> int:
    if a.json:
        print(json.dumps(report.as_dict()))
    else:
        for f in report.failed:
            print(f"FAILED {f['where']} ({f['id']}): [{f['reason']}] {f['error']}", file=sys.stderr)
        parts = [f"{len(report.added)} added"] if report.added or not report.removed else []
        if report.removed:
            parts.append(f"{len(report.removed)} removed")
        if report.failed:
            parts.append(f"{len(report.failed)} failed")
        print(f"{report.path}: {', '.join(parts)}; {report.count} items")
    return 1 if report.failed else 0


def _cmd_bank(a: argparse.Namespace) -> int:
    from moderator import bank_tool
    from moderator.decide.banks import read_bank

    if a.bank_command in ("build", "add"):
        if (a.images is None) == (a.jsonl is None):
            print(f"moderator bank {a.bank_command}: give an image folder or --jsonl FILE (one of them)",
                  file=sys.stderr)
            return 2
        builder = bank_tool.BankBuilder(a.model_dir, batch_size=a.batch_size,
                                        progress=False if a.no_progress else None)
        sources = _bank_sources(a)
        if a.bank_command == "build":
            return _bank_report(a, builder.build(a.bank, a.name or a.bank.stem.replace("-", "_"), sources,
                                                 overwrite=a.overwrite))
        return _bank_report(a, builder.add(a.bank, sources))
    if a.bank_command == "remove":
        return _bank_report(a, bank_tool.remove(a.bank, a.ids))
    if a.bank_command == "bench":
        from moderator.decide.bank_bench import bench_matching, bench_pdq

        if a.pdq:
            for row in bench_pdq(a.sizes, seconds=a.seconds):
                print(json.dumps(row))
            return 0
        for row in bench_matching(a.sizes, dim=a.dim, batch=a.batch, seconds=a.seconds,
                                  faiss_indexes=not a.numpy_only, hnsw=not a.no_hnsw):
            print(json.dumps(row))
        return 0
    bank = read_bank(a.bank)
    if a.bank_command == "info":
        d = bank_tool.info(bank)
        print(json.dumps(d, indent=None if a.json else 2))
        return 0
    for item in bank.items:  # list
        if a.json:
            print(item.model_dump_json(exclude_none=True))
        else:
            print(f"{item.id}\t{item.label or ''}\t{item.added_at}\t{item.sha256 or ''}")
    return 0


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from moderator.calibrate import calibrate, compare_templates

    r = calibrate(a.model_dir, a.policy, a.labels, a.out, flag_precision=a.flag_precision,
                  escalate_recall=a.escalate_recall, holdout=a.holdout, seed=a.seed, version=a.version,
                  plots=not a.no_plots, confidence=a.confidence)
    if a.compare_templates:
        r.report["template_comparison"] = compare_templates(a.model_dir, a.policy, a.labels)
        (r.out_dir / "report.json").write_text(json.dumps(r.report, indent=2))
    if a.json:
        print(json.dumps(r.report))
    else:
        rep = r.report
        print(f"{rep['images']} images: {rep['calibration_images']} to calibrate, {rep['heldout_images']} held out")
        print(f"{'category':<22} {'flag':>9} {'escalate':>9}   held out: flag precision / recall, escalate recall")
        for cid, e in rep["categories"].items():
            if "new" not in e:
                print(f"{cid:<22} {'':>9} {'':>9}   skipped: {e['skipped']}")
                continue
            new, held = e["new"], e["heldout"]
            flag = "null" if new["flag"] is None else f"{new['flag']:.4f}"
            hf, he = held["flag"], held["escalate"]
            fp = f"{hf.get('precision')} / {hf.get('recall')}" if new["flag"] is not None else "(review only)"
            print(f"{cid:<22} {flag:>9} {new['escalate']:>9.4f}   {fp}, {he.get('recall')}"
                  + ("   FLAG PRECISION NOT REACHED (old flag kept)" if "flag_unmet" in e else ""))
        print(f"policy: {r.policy_path} (version {rep['new_version']}); report: {r.out_dir / 'report.json'}"
              + (f"; plots: {', '.join(p.name for p in r.plots)}" if r.plots else ""))
    for cid in dict.fromkeys(r.unmet):
        e = r.report["categories"][cid]
        for key in ("skipped", "flag_unmet", "escalate_unmet"):
            if key in e:
                print(f"moderator calibrate: warning: {cid}: {e[key]}", file=sys.stderr)
    return 0


def _cmd_docs(a: argparse.Namespace) -> int:
    from moderator import docs

    if a.write or a.check:
        fresh = docs.update_readme(a.readme, check=a.check)
        if a.check and not fresh:
            print(f"{a.readme}: generated reference tables are stale; run `moderator docs --write`",
                  file=sys.stderr)
            return 1
        return 0
    print(docs.config_reference() if a.what == "config" else docs.metrics_reference(), end="")
    return 0


def version_line() -> str:
    """``moderator X.Y.Z`` and the ONNX Runtime build installed beside it (from package
    metadata: nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from moderator import __version__

    runtimes = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            runtimes.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    python = ".".join(map(str, sys.version_info[:3]))
    return f"moderator {__version__} ({', '.join(runtimes) or 'no onnxruntime'}; python {python})"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


BENCH_ENVELOPES = ("json", "cloudevents", "cloudevents-base64", "cloudevents-binary", "cloudevents-binary-image",
                   "raw")
LOAD_GENERATORS = ("kafka-python", "librdkafka")  # moderator.produce.CLIENTS, likewise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moderator", description=__doc__.splitlines()[0])
    p.add_argument("--version", action=_VersionAction, help="print the version (and the ONNX Runtime build) and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="logs on stderr: text, or JSON lines with ECS field names (default: $MODERATOR_LOG_FORMAT, "
                        "else text; `run` follows MODERATOR_LOG_JSON, on by default)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="export an open_clip model to an ONNX model directory",
                       description="Export an open_clip model (pretrained tag, checkpoint, or random "
                                   "weights) to a model directory: ONNX encoders, tokenizer, manifest.")
    e.add_argument("--model", default="moderator-tiny", help="open_clip architecture (default: %(default)s)")
    e.add_argument("--config", type=Path, help="a custom open_clip model config JSON (overrides --model)")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--pretrained", help="open_clip pretrained tag (downloads; needs internet)")
    src.add_argument("--checkpoint", type=Path,
                     help="local weights: an open_clip local-dir (from `moderator finetune`), "
                          ".safetensors, or a torch checkpoint (loaded weights-only)")
    e.add_argument("--seed", type=int, default=0, help="seed for random weights (default: %(default)s)")
    e.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    e.add_argument("--out", type=Path, required=True, help="model directory to write")
    e.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    e.add_argument("--quantize", choices=("int8",),
                   help="serve a static QDQ int8 image encoder (text encoder stays fp32); needs --calibration-dir")
    e.add_argument("--calibration-dir", type=Path,
                   help="typical input images (files directly in DIR) that fix the int8 activation ranges")
    e.add_argument("--full-range", action="store_true",
                   help="8-bit weights instead of 7 (only for fleets whose CPUs all have VNNI, or ARM: without "
                        "VNNI, ONNX Runtime's int8 kernels saturate on them)")
    e.add_argument("--calibration-images", type=int, default=200,
                   help="calibration images to use, at most (default: %(default)s)")
    e.set_defaults(func=_cmd_export)

    s = sub.add_parser("synth", help="draw the synthetic shapes data set",
                       description="Write a seeded synthetic image-caption data set (PNG + JSONL).")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--train", type=int, default=12000, help="training images (default: %(default)s)")
    s.add_argument("--heldout", type=int, default=1000, help="held-out images (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=96, help="image side in pixels (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="print one JSON object (splits, paths, counts)")
    s.add_argument("--policy-labels", action="store_true",
                   help="also write <split>.policy-labels.jsonl: the demo policy's categories per image "
                        "(input of moderator calibrate)")
    s.set_defaults(func=_cmd_synth)

    f = sub.add_parser("finetune", help="train / fine-tune CLIP on image-caption pairs",
                       description="Train or fine-tune an open_clip model on JSONL image-caption pairs.")
    f.add_argument("--data", type=Path, required=True, help="JSONL with path and caption per line")
    f.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    f.add_argument("--model", default="moderator-tiny")
    f.add_argument("--config", type=Path)
    init = f.add_mutually_exclusive_group()
    init.add_argument("--pretrained", help="start from an open_clip pretrained tag")
    init.add_argument("--init-checkpoint", type=Path, help="start from local weights")
    f.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--batch-size", type=int, default=128)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--weight-decay", type=float, default=0.1)
    f.add_argument("--warmup-steps", type=int, default=20)
    f.add_argument("--freeze-towers", action="store_true",
                   help="train only the projections and temperature (stable domain adaptation)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, help="torch CPU threads")
    f.add_argument("--json", action="store_true", help="print the result as one JSON object")
    f.set_defaults(func=_cmd_finetune)

    d = sub.add_parser("demo-model", help="train (or reuse) the synthetic demo model and report accuracy",
                       description="Train, export and evaluate the tiny demo CLIP (cached).")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--force", action="store_true", help="retrain even when cached")
    d.add_argument("--write-labels", type=Path, metavar="FILE",
                   help="write the held-out set's labels for the demo policy (input of moderator calibrate)")
    d.add_argument("--json", action="store_true", help="print the report as one JSON object")
    d.add_argument("--compare-templates", action="store_true",
                   help="held-out zero-shot accuracy with each template alone and with the ensemble")
    d.set_defaults(func=_cmd_demo_model)

    c = sub.add_parser("classify", help="decide allow/flag/escalate for local image files",
                       description="Classify local images (files or directories) against a policy. "
                                   "Exit status 1 when any file failed to decode.")
    c.add_argument("images", type=Path, nargs="+", help="image files or directories")
    c.add_argument("--model", type=Path, required=True, help="exported model directory")
    c.add_argument("--policy", type=Path, required=True, help="policy YAML")
    c.add_argument("--json", action="store_true", help="one JSON decision (or error) per line")
    c.add_argument("--redis-url", help="cache policy embeddings in Redis (optional)")
    c.add_argument("--max-bytes", type=int, default=20 * 1024 * 1024, help="per-file byte cap")
    c.add_argument("--max-pixels", type=int, default=40_000_000, help="decompression-bomb pixel cap")
    c.set_defaults(func=_cmd_classify)

    ev = sub.add_parser("evaluate-policy", help="confusion matrix of a policy on labelled images",
                        description="Run a policy over labelled images (JSONL: path, label) and print "
                                    "label x action counts, to calibrate thresholds.")
    ev.add_argument("data", type=Path, help="JSONL with path and label per line")
    ev.add_argument("--model", type=Path, required=True)
    ev.add_argument("--policy", type=Path, required=True)
    ev.add_argument("--redis-url")
    ev.add_argument("--json", action="store_true", help="print the confusion matrix as one JSON object")
    ev.set_defaults(func=_cmd_evaluate_policy)

    b = sub.add_parser("bench-encoder", help="images/s of the image encoder at several batch sizes",
                       description="Benchmark the image encoder(s) of a model directory.")
    b.add_argument("model_dir", type=Path)
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    b.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    b.add_argument("--backends", nargs="+", default=["onnx"],
                   choices=("onnx", "torch", "torch-eager", "torch-fp32"),
                   help="torch = fp16 + CUDA graphs on CUDA; torch-eager = fp16, no graphs; "
                        "torch-fp32 = fp32, no graphs")
    b.set_defaults(func=_cmd_bench_encoder)

    r = sub.add_parser("run", help="the streaming worker: Kafka in, decisions out",
                       description="Consume input events, decide with the policy, publish decisions "
                                   "(at-least-once, or exactly-once). Every setting is a flag and a MODERATOR_* "
                                   "environment variable (generated from moderator.config.WorkerSettings); a flag "
                                   "beats the variable. Keep secrets (passwords) in the environment: flags show "
                                   "in the process list.")
    from moderator.settings_cli import add_settings_flags

    r.set_defaults(func=_cmd_run, settings_source=add_settings_flags(r))

    pr = sub.add_parser("produce", help="send input events (image directory or synthetic shapes) to a topic",
                        description="Produce input events for demos, tests and benchmarks. Prints one JSON "
                                    "line with what was sent.")
    pr.add_argument("--bootstrap-servers",
                    help="Kafka (default: MODERATOR_KAFKA_BOOTSTRAP_SERVERS); TLS and SASL come from the "
                         "worker's MODERATOR_KAFKA_* variables")
    pr.add_argument("--topic", required=True)
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", type=Path, help="send every image file under this directory")
    src.add_argument("--synthetic", type=int, metavar="N", help="send N synthetic demo images")
    pr.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    pr.add_argument("--envelopes", default="json",
                    help="comma-separated mix of json, cloudevents, cloudevents-base64, cloudevents-binary, "
                         "cloudevents-binary-image, raw (default: %(default)s)")
    pr.add_argument("--duplicates", type=float, default=0.0, help="share of synthetic events repeating an image")
    pr.add_argument("--malformed", type=int, default=0, help="mix in up to this many malformed events")
    pr.add_argument("--malformed-every", type=int, default=20, help="one malformed event per this many good")
    pr.add_argument("--size", type=int, default=96, help="synthetic image side (default: %(default)s)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--id-prefix", help="prefix of event ids")
    pr.add_argument("--create-topic", type=int, metavar="PARTITIONS", help="create the topic if missing")
    pr.add_argument("--manifest", type=Path, help="write id, expected outcome and send time per event (JSONL)")
    pr.set_defaults(func=_cmd_produce)

    bw = sub.add_parser("bench-worker", help="worker decisions/s vs its bare encoder, in one run",
                        description="Benchmark the whole worker against its image encoder on the same images, "
                                    "in one run (--source kafka starts a local Kafka unless given one). Prints "
                                    "one JSON line.")
    bw.add_argument("--model", type=Path, required=True)
    bw.add_argument("--policy", type=Path, required=True)
    bw.add_argument("--source", choices=("kafka", "memory"), default="kafka",
                    help="kafka: through a real broker; memory: the same pipeline without Kafka (its ceiling)")
    bw.add_argument("--events", type=int, default=2000)
    bw.add_argument("--image", choices=("png", "jpeg"), default="png",
                    help="png: synthetic shapes; jpeg: photo-like JPEGs at quality 85")
    bw.add_argument("--size", type=_size, default=(96, 96), help="N or WxH (default: 96)")
    # moderator.produce.ENVELOPES, spelled out: importing it here would load numpy and the CloudEvents
    # SDK for every command (tests/test_cli.py checks the two agree)
    bw.add_argument("--envelope", choices=BENCH_ENVELOPES, default="json",
                    help="json/cloudevents*: the image base64 inside; cloudevents-binary-image and raw: the image "
                         "bytes as the record value")
    bw.add_argument("--unique-images", type=int, default=256,
                    help="distinct images the events cycle through (drawing 1024x768 photos takes ~0.1 s each)")
    bw.add_argument("--backend", choices=("onnx", "torch"), default="onnx", help="MODERATOR_ENCODER_BACKEND")
    bw.add_argument("--max-batch", type=int, default=32)
    bw.add_argument("--max-wait-ms", type=int, default=50)
    bw.add_argument("--partitions", type=int, default=3)
    bw.add_argument("--prepare-workers", type=int, help="MODERATOR_PREPARE_WORKERS (default: the setting's)")
    bw.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false", help="decode JPEGs at full size")
    bw.add_argument("--no-adaptive-batching", dest="adaptive_batching", action="store_false",
                    help="batches always wait for max_batch or max_wait_ms")
    bw.add_argument("--gpu-decode", action=argparse.BooleanOptionalAction, default=True,
                    help="torch backend on CUDA: nvJPEG batch decode (MODERATOR_GPU_DECODE)")
    bw.add_argument("--ort-spin-wait", action="store_true", help="MODERATOR_ORT_SPIN_WAIT=true in the worker")
    bw.add_argument("--set", action="append", metavar="SETTING=VALUE",
                    help="any other worker setting for this run, e.g. --set ort_threads=1 (repeatable)")
    bw.add_argument("--encoder-seconds", type=float, default=5.0)
    bw.add_argument("--latency", action="store_true",
                    help="then run at half the measured rate and report p50/p99 consume -> acknowledged")
    bw.add_argument("--latency-events", type=int, help="events in the latency phase (default: min(events, 2000))")
    bw.add_argument("--latency-rate", type=float,
                    help="events/s in the latency phase (default: half the measured rate); the JSON key stays "
                         "latency_at_half_rate with its rate_per_s")
    bw.add_argument("--load-generator", choices=LOAD_GENERATORS, default="kafka-python",
                    help="the latency phase's Kafka producer, in its own process: librdkafka (confluent-kafka, "
                         "the dev extra) costs about a quarter of kafka-python's CPU per event, which a small "
                         "machine otherwise takes from the worker (default: %(default)s)")
    bw.add_argument("--seed-loop-model", type=Path,
                    help="also time the prototype loop (6 prompts + the image per image, batch 1) on this model")
    bw.add_argument("--profile", type=Path, metavar="FILE",
                    help="py-spy the measured phase: FILE.svg flame graph, else collapsed stacks (+ top frames)")
    bw.add_argument("--profile-gil", action="store_true",
                    help="with --profile: sample only the thread holding the GIL")
    bw.add_argument("--compare-guarantees", type=int, metavar="ROUNDS",
                    help="run at_least_once and exactly_once in turn, ROUNDS times each, through one broker, "
                         "and report the ratio of their medians")
    bw.add_argument("--compare-policy", type=Path, metavar="POLICY",
                    help="run --policy and this policy in turn (--rounds each) and report the throughput ratio: "
                         "what banks, PDQ or more categories cost")
    bw.add_argument("--rounds", type=int, default=2, help="rounds per policy for --compare-policy")
    bw.add_argument("--bootstrap-servers", help="use this Kafka instead of starting one")
    bw.add_argument("--processes", type=int, default=1, metavar="N",
                    help="memory source: N worker processes side by side (events shared, started together), "
                         "e.g. several per GPU past one process's GIL; prints their aggregate decisions/s. "
                         "kafka source: `moderator run` as 1 and as N processes (--processes), same events")
    bw.add_argument("--start-gate", type=Path, help=argparse.SUPPRESS)  # --processes' children
    bw.set_defaults(func=_cmd_bench_worker)

    bd = sub.add_parser("bench-draft", help="JPEG draft on/off: held-out accuracy, pixel difference, speed",
                        description="The demo domain's held-out scenes as large JPEGs through the worker's decode "
                                    "path with and without JPEG draft (DCT-domain downscale). Prints one JSON line.")
    bd.add_argument("--model", type=Path, help="model directory (default: the cached demo model)")
    bd.add_argument("--n", type=int, default=1000, help="held-out images (default: %(default)s)")
    bd.add_argument("--size", type=int, default=512, help="image side in px (default: %(default)s)")
    bd.add_argument("--quality", type=int, default=85)
    bd.set_defaults(func=_cmd_bench_draft)

    bs = sub.add_parser("bench-soak", help="the worker's RSS under a steady mixed load",
                        description="`moderator run` in a subprocess under a steady rate of good, re-sent and "
                                    "malformed events (local Kafka and Redis unless given); samples its RSS. "
                                    "Prints one JSON line with the series and the growth after warm-up.")
    bs.add_argument("--model", type=Path, help="model directory (default: the cached demo model)")
    bs.add_argument("--policy", type=Path, help="policy (default: the packaged demo policy)")
    bs.add_argument("--seconds", type=float, default=300.0)
    bs.add_argument("--rate", type=float, default=50.0, help="events per second (default: %(default)s)")
    bs.add_argument("--bootstrap-servers", help="an existing Kafka (default: start one)")
    bs.add_argument("--redis-url", help="an existing Redis (default: start one)")
    bs.set_defaults(func=_cmd_bench_soak)

    dm = sub.add_parser("demo", help="the streaming demo: local Kafka + Redis, a worker, a few hundred events",
                        description="Run the whole service locally with the demo model and policy and print "
                                    "a summary (make demo).")
    dm.add_argument("--model", type=Path, help="model directory (default: the cached demo model)")
    dm.add_argument("--policy", type=Path, help="policy (default: the packaged demo policy, moderator/data/policies/demo.yaml)")
    dm.add_argument("--events", type=int, default=300)
    dm.add_argument("--rate", type=float, default=50.0,
                    help="events per second; 0: as fast as possible (default: %(default)s)")
    dm.add_argument("--partitions", type=int, default=3)
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--hold", action="store_true", help="keep everything running until Ctrl-C")
    dm.add_argument("--json", action="store_true", help="print the summary as one JSON object (last line)")
    dm.set_defaults(func=_cmd_demo)

    cal = sub.add_parser("calibrate", help="per-category thresholds from labelled images (PR curves, report)",
                         description="Choose flag thresholds for a precision and escalate thresholds for a "
                                     "recall on a calibration split, report them on a held-out split, and "
                                     "write the policy with the new thresholds and a new version.")
    cal.add_argument("--labels", type=Path, required=True,
                     help='JSON Lines: {"path": ..., "categories": [ids] or "none"} per image')
    cal.add_argument("--policy", type=Path, required=True)
    cal.add_argument("--model-dir", type=Path, required=True)
    cal.add_argument("--out", type=Path, required=True, help="folder for policy.yaml, report.json and the PNGs")
    cal.add_argument("--flag-precision", type=float, default=0.95)
    cal.add_argument("--escalate-recall", type=float, default=0.9)
    cal.add_argument("--holdout", type=float, default=0.5, help="share of images held out (default: %(default)s)")
    cal.add_argument("--seed", type=int, default=0, help="the split's seed")
    cal.add_argument("--confidence", type=float, default=0.9,
                     help="a target counts as met when its one-sided Wilson lower bound at this confidence "
                          "reaches it on the calibration split; 0: the observed share (default: %(default)s)")
    cal.add_argument("--version", help="version of the new policy (default: <old>+cal.<UTC time>)")
    cal.add_argument("--no-plots", action="store_true")
    cal.add_argument("--compare-templates", action="store_true",
                     help="also report the policy's precision/recall with its template ensemble vs its first "
                          "template only")
    cal.add_argument("--json", action="store_true", help="print the report as JSON")
    cal.set_defaults(func=_cmd_calibrate)

    bk = sub.add_parser("bank", help="build and edit image banks (known-bad and allow-list embeddings)",
                        description="Image banks: embeddings of known images under one model, matched by the "
                                    "worker when a policy lists them (policy `banks:`).")
    bsub = bk.add_subparsers(dest="bank_command", required=True, metavar="BANK_COMMAND")
    for name, help_text in (("build", "a new bank file from an image folder or a JSONL of paths"),
                            ("add", "embed more images into an existing bank file")):
        x = bsub.add_parser(name, help=help_text)
        x.add_argument("bank", type=Path, help="the bank file (.npz)")
        x.add_argument("images", type=Path, nargs="?", help="folder of images (ids: paths relative to it)")
        x.add_argument("--jsonl", type=Path, help="JSON Lines: path, and optional id, label, source per line")
        x.add_argument("--model-dir", type=Path, required=True, help="the exported model the worker serves")
        x.add_argument("--label", help="label for items without their own")
        x.add_argument("--source", help="source for items without their own (default: the file path)")
        x.add_argument("--batch-size", type=int, default=32)
        x.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
        x.add_argument("--json", action="store_true", help="print the result as one JSON object")
        if name == "build":
            x.add_argument("--name", help="bank name (default: the file name's stem)")
            x.add_argument("--overwrite", action="store_true", help="replace an existing bank file")
    x = bsub.add_parser("remove", help="remove items by id")
    x.add_argument("bank", type=Path)
    x.add_argument("ids", nargs="+")
    x.add_argument("--json", action="store_true")
    for name, help_text in (("list", "one line per item: id, label, added-at, sha256"),
                            ("info", "the bank's manifest, sha256 and label counts")):
        x = bsub.add_parser(name, help=help_text)
        x.add_argument("bank", type=Path)
        x.add_argument("--json", action="store_true", help="JSON (one object per item for list)")
    x = bsub.add_parser("bench", help="match latency per batch for banks of several sizes (random embeddings)")
    x.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    x.add_argument("--dim", type=int, default=512)
    x.add_argument("--batch", type=int, default=32)
    x.add_argument("--seconds", type=float, default=2.0, help="time per size")
    x.add_argument("--numpy-only", action="store_true", help="skip the FAISS comparison")
    x.add_argument("--no-hnsw", action="store_true", help="skip FAISS HNSW (minutes to build above 100k items)")
    x.add_argument("--pdq", action="store_true", help="PDQ instead: hashing ms per image by size, and matching "
                                                       "against PDQ banks of --sizes hashes")
    bk.set_defaults(func=_cmd_bank)

    dc = sub.add_parser("docs", help="print or refresh the README's configuration and metrics reference",
                        description="Reference tables generated from moderator.config and moderator.metrics.")
    dc.add_argument("what", nargs="?", choices=("config", "metrics"), default="config",
                    help="table to print (default: %(default)s)")
    dc.add_argument("--readme", type=Path, default=Path("README.md"))
    mode = dc.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="refresh the README's generated blocks")
    mode.add_argument("--check", action="store_true", help="exit 1 if the README's blocks are stale")
    dc.set_defaults(func=_cmd_docs)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit statuses (``moderator.errors``): 0 ok, 1 some inputs failed, 2 usage or configuration
    error (argparse's own too), 3 runtime error (a service unreachable, a fatal worker error, a
    bug), 130 interrupted."""
    from pydantic import ValidationError

    from moderator.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, exit_status

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    level = logging.DEBUG if args.verbose else logging.WARNING
    log_format = args.log_format or os.environ.get("MODERATOR_LOG_FORMAT", "text")
    if log_format not in ("text", "json"):
        print(f"moderator: MODERATOR_LOG_FORMAT={log_format!r}: must be text or json", file=sys.stderr)
        return EXIT_USAGE
    if log_format == "json":
        from moderator.logs import configure_logging, service_fields

        configure_logging(logging.getLevelName(level), True, service_fields())
    else:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ModeratorError as e:
        print(f"moderator {args.command}: error [{e.reason}]: {e}", file=sys.stderr)
        return exit_status(e)
    except ValidationError as e:  # settings from MODERATOR_* (values are never echoed: they may be secrets)
        print(f"moderator {args.command}: invalid settings:\n{e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - a bug: the traceback, then a status distinct from usage errors
        import traceback

        traceback.print_exc()
        print(f"moderator {args.command}: unexpected error (exit {EXIT_RUNTIME}); the traceback above "
              "belongs in a bug report", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
