"""``moderator calibrate``: per-category thresholds from labelled images instead of by feel.

Labelled data is JSON Lines, one image per line: ``{"path": "...", "categories": ["weapons"]}``
(``"categories": "none"`` or ``[]`` for an image that belongs to no category; paths are
relative to the labels file). A label also counts for the category's ancestors, the way
decisions roll up. The images are scored through the serving path (decoder, ONNX image
encoder, the policy's own scoring), split deterministically into a calibration part and a
held-out part (by a hash of the path), and for every enabled category:

- ``flag``: the lowest threshold whose precision on the calibration split is at least
  ``flag_precision`` (most recall at that precision). A review-only category (``flag: null``)
  stays review-only. When no threshold reaches the precision, the old value stays and the
  report says so.
- ``escalate``: the highest threshold whose recall on the calibration split is at least
  ``escalate_recall`` (least review work at that recall), never above ``flag``.

"At least" is judged at a ``confidence`` (default 0.9): the one-sided Wilson lower bound
of the precision (or recall) must reach the target, not only the observed share, so a
threshold that met its target on a few dozen positives by luck is not chosen
(``confidence=0``: observed shares).

Both are then reported on the held-out split. Outputs: the policy with the new thresholds
and a new version (every other field as it was), ``report.json``, and a PNG per category
(score distributions and precision-recall curves with the chosen points marked).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from statistics import NormalDist
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from moderator.classify import Classifier
from moderator.decide.banks import read_json_lines
from moderator.decide.policy import load_policy
from moderator.errors import BankError, LabelsError
from moderator.schemas import PolicyDoc


@dataclass(frozen=True)
class Labelled:
    path: Path
    categories: frozenset[str]  # with ancestors added
    line: int
    key: str = ""  # the path as the labels file writes it: what the split hashes (stable across machines)


def _ancestors(doc: PolicyDoc) -> dict[str, list[str]]:
    parent = {c.id: c.parent for c in doc.categories}
    out = {}
    for cid in parent:
        chain, cur = [], parent[cid]
        while cur is not None:
            chain.append(cur)
            cur = parent[cur]
        out[cid] = chain
    return out


def read_labels(path: Path, doc: PolicyDoc) -> list[Labelled]:
    """Every problem is a ``LabelsError`` naming the file and line: unknown categories, missing
    or duplicate images, malformed lines."""
    path = Path(path)
    known = {c.id for c in doc.categories}
    up = _ancestors(doc)
    try:
        rows = read_json_lines(path)
    except BankError as e:  # the shared JSONL reader names file and line
        raise LabelsError(str(e)) from e
    if not rows:
        raise LabelsError(f"{path}: no labelled images")
    out, seen = [], {}
    for lineno, obj in rows:
        where = f"{path}:{lineno}"
        p = obj.get("path")
        if not isinstance(p, str) or not p:
            raise LabelsError(f"{where}: each line needs a \"path\" (string)")
        cats = obj.get("categories")
        if cats == "none" or cats == []:
            cats = []
        elif not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise LabelsError(f"{where}: \"categories\" must be a list of category ids, or \"none\"")
        unknown = sorted(set(cats) - known)
        if unknown:
            raise LabelsError(f"{where}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} "
                              f"(the policy has {sorted(known)})")
        full = Path(p) if Path(p).is_absolute() else path.parent / p
        if not full.is_file():
            raise LabelsError(f"{where}: image {p} not found ({full})")
        if full in seen:
            raise LabelsError(f"{where}: image {p} is already labelled on line {seen[full]}")
        seen[full] = lineno
        closed = set(cats)
        for c in cats:
            closed.update(up[c])
        out.append(Labelled(full, frozenset(closed), lineno, p))
    return out


def split_of(key: str, seed: int, holdout: float) -> str:
    h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return "heldout" if int.from_bytes(h[:8], "big") / 2**64 < holdout else "calibration"


# --- the arithmetic ------------------------------------------------------------------------------


def pr_curve(scores: np.ndarray, positive: np.ndarray) -> dict[str, np.ndarray]:
    """Precision and recall of ``score >= t`` for every distinct score ``t`` (descending)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order].astype(np.int64)
    tp, fp = np.cumsum(y), np.cumsum(1 - y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each distinct score
    n_pos = max(int(y.sum()), 1)
    return {"threshold": s[last], "precision": tp[last] / (tp[last] + fp[last]), "recall": tp[last] / n_pos,
            "tp": tp[last], "fp": fp[last]}


def wilson_lower(k: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Wilson score lower bound of a binomial share ``k / n`` (``confidence`` 0: ``k / n``)."""
    k, n = np.asarray(k, dtype=np.float64), np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    p = k / n
    if confidence <= 0:
        return p
    z = NormalDist().inv_cdf(confidence)
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def flag_threshold(curve: dict, precision: float, confidence: float = 0.0) -> float | None:
    """The lowest threshold whose precision (its lower bound at ``confidence``) reaches the target."""
    lower = wilson_lower(curve["tp"], curve["tp"] + curve["fp"], confidence)
    ok = np.nonzero(lower >= precision)[0]
    return None if not len(ok) else float(curve["threshold"][ok.max()])


def escalate_threshold(curve: dict, recall: float, confidence: float = 0.0) -> float | None:
    """The highest threshold whose recall (its lower bound at ``confidence``) reaches the target."""
    n_pos = curve["tp"][-1] if len(curve["tp"]) else 0
    lower = wilson_lower(curve["tp"], np.full(len(curve["tp"]), n_pos), confidence)
    ok = np.nonzero(lower >= recall)[0]
    return None if not len(ok) else float(curve["threshold"][ok.min()])


def at(scores: np.ndarray, positive: np.ndarray, t: float | None) -> dict:
    if t is None:
        return {"threshold": None}
    pred = scores >= t
    tp, fp = int((pred & positive).sum()), int((pred & ~positive).sum())
    p = int(positive.sum())
    return {"threshold": round(t, 6), "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / p, 4) if p else None, "tp": tp, "fp": fp, "fn": p - tp}


def _quantiles(x: np.ndarray) -> dict:
    if not len(x):
        return {"n": 0}
    q = np.quantile(x, [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1])
    return {"n": int(len(x)), **{k: round(float(v), 4) for k, v in zip(
        ("min", "p05", "p25", "median", "p75", "p95", "max"), q)}}


def _round_down(t: float) -> float:
    """6 decimals, never above ``t`` (the policy file's value must keep every chosen image)."""
    return math.floor(t * 1e6) / 1e6


# --- the command ---------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    out_dir: Path
    policy_path: Path
    report: dict
    plots: list[Path] = field(default_factory=list)
    unmet: list[str] = field(default_factory=list)


def score_images(clf: Classifier, items: list[Labelled], batch_size: int = 64) -> np.ndarray:
    """(n, C) scores of the policy's enabled categories, through the serving path (the worker's
    decoder with its JPEG draft, the ONNX image encoder, the policy's scoring), unrounded."""
    from moderator.classify import decode_file  # noqa: PLC0415
    from moderator.errors import ModeratorError  # noqa: PLC0415
    from moderator.progress import progress_bar  # noqa: PLC0415

    out = []
    bar = progress_bar(len(items), "calibrate: scoring")
    for start in range(0, len(items), batch_size):
        images = []
        for it in items[start:start + batch_size]:
            try:
                images.append(decode_file(it.path, clf.limits, clf.draft).image)
            except ModeratorError as e:
                raise LabelsError(f"{it.path}: (labels line {it.line}) [{e.reason}] {e}") from e
        out.append(clf.engine.policy.scores(clf.image_encoder.encode(images)))
        bar.update(len(images))
    bar.close()
    return np.concatenate(out).astype(np.float64)


def calibrate(model_dir: Path, policy_path: Path, labels: Path, out_dir: Path, *, flag_precision: float = 0.95,
              escalate_recall: float = 0.9, holdout: float = 0.5, seed: int = 0, version: str | None = None,
              plots: bool = True, confidence: float = 0.9) -> CalibrationResult:
    if not 0 < flag_precision <= 1 or not 0 < escalate_recall <= 1:
        raise LabelsError("--flag-precision and --escalate-recall must be in (0, 1]")
    if not (confidence == 0 or 0.5 <= confidence < 1):
        raise LabelsError("--confidence must be 0 (observed shares) or in [0.5, 1) (a one-sided lower bound)")
    if confidence > 0 and (flag_precision >= 1 or escalate_recall >= 1):
        raise LabelsError("a target of 1.0 can never be proven at a confidence above 0: lower it, or use "
                          "--confidence 0")
    if not 0 < holdout < 1:
        raise LabelsError("--holdout must be between 0 and 1")
    loaded = load_policy(policy_path)
    items = read_labels(labels, loaded.doc)
    clf = Classifier(model_dir, policy_path)
    scores = score_images(clf, items)
    cats = [cc.cat for cc in clf.engine.policy.categories]
    split = np.array([split_of(it.key, seed, holdout) for it in items])
    cal, held = split == "calibration", split == "heldout"
    report: dict = {
        "labels": str(labels), "images": len(items), "calibration_images": int(cal.sum()),
        "heldout_images": int(held.sum()), "seed": seed, "holdout": holdout, "confidence": confidence,
        "flag_precision": flag_precision,
        "escalate_recall": escalate_recall, "policy": str(policy_path), "policy_version": loaded.doc.version,
        "policy_sha256": loaded.sha256, "model_sha256": clf.model_dir.model_sha256, "categories": {},
    }
    new_thresholds: dict[str, dict] = {}
    unmet: list[str] = []
    curves = {}
    for j, cat in enumerate(cats):
        pos = np.array([cat.id in it.categories for it in items])
        s = scores[:, j]
        entry = {"score_rule": "contrast probability" if cat.contrast_prompts else "cosine",
                 "old": cat.thresholds.model_dump(),
                 "scores": {part: {"positives": _quantiles(s[mask & pos]), "negatives": _quantiles(s[mask & ~pos])}
                            for part, mask in (("calibration", cal), ("heldout", held))}}
        if not (pos & cal).any() or not (~pos & cal).any():
            entry["skipped"] = "the calibration split needs positives and negatives of this category"
            unmet.append(cat.id)
            report["categories"][cat.id] = entry
            continue
        curve = pr_curve(s[cal], pos[cal])
        curves[cat.id] = (curve, pr_curve(s[held], pos[held]) if (pos & held).any() else None)
        flag = cat.thresholds.flag
        if flag is not None:
            chosen = flag_threshold(curve, flag_precision, confidence)
            if chosen is None:
                entry["flag_unmet"] = (f"no threshold reaches precision {flag_precision} on the calibration split "
                                       f"at confidence {confidence} ({int(pos[cal].sum())} positives): old flag kept")
                unmet.append(cat.id)
            else:
                flag = _round_down(chosen)
        esc = escalate_threshold(curve, escalate_recall, confidence)
        if esc is None:  # even the lowest score's recall bound misses the target: escalate everything scored
            entry["escalate_unmet"] = (f"recall {escalate_recall} unreachable at confidence {confidence} with "
                                       f"{int(pos[cal].sum())} positives: escalate set to the lowest positive score")
            unmet.append(cat.id)
            esc = float(s[cal & pos].min())
        esc = _round_down(esc)
        if flag is not None and esc > flag:
            esc = flag
        new_thresholds[cat.id] = {"flag": flag, "escalate": esc}
        entry["new"] = new_thresholds[cat.id]
        entry["calibration"] = {"flag": at(s[cal], pos[cal], flag), "escalate": at(s[cal], pos[cal], esc)}
        entry["heldout"] = {"flag": at(s[held], pos[held], flag), "escalate": at(s[held], pos[held], esc)}
        report["categories"][cat.id] = entry

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["out_dir"] = str(out_dir)
    new_version = version or f"{loaded.doc.version}+cal.{datetime.now(timezone.utc).strftime('%Y%m%d%H%M')}"
    policy_out = out_dir / "policy.yaml"
    policy_out.write_text(_rewrite_policy(loaded, new_thresholds, new_version, report))
    load_policy(policy_out)  # what we wrote must load
    report["new_policy"] = str(policy_out)
    report["new_version"] = new_version
    result = CalibrationResult(out_dir, policy_out, report, unmet=unmet)
    if plots:
        for cat in cats:
            if cat.id in curves:
                result.plots.append(_plot(out_dir / f"{cat.id}.png", cat.id, scores[:, [c.id for c in cats].index(
                    cat.id)], np.array([cat.id in it.categories for it in items]), cal, held, curves[cat.id],
                    report["categories"][cat.id], flag_precision, escalate_recall))
    report["plots"] = [str(p) for p in result.plots]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return result


def _rewrite_policy(loaded, thresholds: dict[str, dict], version: str, report: dict) -> str:
    """The source policy with new thresholds and version; every other field as it was."""
    raw = yaml.safe_load(loaded.path.read_bytes())
    raw["version"] = version
    for c in raw["categories"]:
        if c["id"] in thresholds:
            c["thresholds"] = dict(thresholds[c["id"]])
    out_dir = Path(report["out_dir"]).resolve()
    for key in ("banks", "pdq_banks"):  # relative bank paths must still find their files from the new folder
        for ref in raw.get(key) or ():
            if not Path(ref["path"]).is_absolute():
                ref["path"] = os.path.relpath((loaded.path.parent / ref["path"]).resolve(), out_dir)
    header = (f"# Calibrated by `moderator calibrate` from {report['labels']} ({report['calibration_images']} "
              f"calibration images, {report['heldout_images']} held out)\n"
              f"# on {datetime.now(timezone.utc).isoformat(timespec='seconds')}: flag precision >= "
              f"{report['flag_precision']}, escalate recall >= {report['escalate_recall']}.\n"
              f"# Source policy: {loaded.path} version {loaded.doc.version} (sha256 {loaded.sha256[:12]}).\n")
    return header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=100)


def _plot(path: Path, cid: str, s: np.ndarray, pos: np.ndarray, cal: np.ndarray, held: np.ndarray, curves,
          entry: dict, flag_precision: float, escalate_recall: float) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax_h, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = np.linspace(min(0.0, float(s.min())), max(1.0, float(s.max())), 41)
    ax_h.hist(s[~pos], bins=bins, alpha=0.6, label=f"negatives ({int((~pos).sum())})", color="tab:blue")
    ax_h.hist(s[pos], bins=bins, alpha=0.6, label=f"positives ({int(pos.sum())})", color="tab:red")
    ax_h.set_yscale("log")
    new = entry["new"]
    for name, style in (("flag", "-"), ("escalate", "--")):
        if new[name] is not None:
            ax_h.axvline(new[name], color="k", linestyle=style, label=f"{name} {new[name]:.3f}")
    ax_h.set_xlabel("score")
    ax_h.set_ylabel("images (log)")
    ax_h.set_title(f"{cid}: score distributions (all images)")
    ax_h.legend(fontsize=8)
    cal_curve, held_curve = curves
    ax_pr.plot(cal_curve["recall"], cal_curve["precision"], label="calibration split", color="tab:gray")
    if held_curve is not None:
        ax_pr.plot(held_curve["recall"], held_curve["precision"], label="held-out split", color="tab:green")
    for name, marker in (("flag", "o"), ("escalate", "s")):
        for part, color in (("calibration", "tab:gray"), ("heldout", "tab:green")):
            pt = entry[part][name]
            if pt.get("precision") is not None and pt.get("recall") is not None:
                ax_pr.plot(pt["recall"], pt["precision"], marker, color=color, markersize=8,
                           markeredgecolor="k", label=f"{name} ({part}) P={pt['precision']:.3f} R={pt['recall']:.3f}")
    ax_pr.axhline(flag_precision, color="tab:red", linewidth=0.8, linestyle=":")
    ax_pr.axvline(escalate_recall, color="tab:orange", linewidth=0.8, linestyle=":")
    ax_pr.set_xlim(0, 1.02)
    ax_pr.set_ylim(0, 1.02)
    ax_pr.set_xlabel("recall")
    ax_pr.set_ylabel("precision")
    ax_pr.set_title(f"{cid}: precision-recall (targets dotted)")
    ax_pr.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def compare_templates(model_dir: Path, policy_path: Path, labels: Path) -> dict:
    """The policy's flag and escalate precision/recall on every labelled image, with its template
    ensemble and with only its first template (same thresholds): does the ensemble help?"""
    loaded = load_policy(policy_path)
    items = read_labels(labels, loaded.doc)
    raw = yaml.safe_load(loaded.path.read_bytes())
    single = copy.deepcopy(raw)
    single["templates"] = [loaded.doc.templates[0]]
    single["categories"] = [{**c, "templates": [c["templates"][0]]} if c.get("templates") else c
                            for c in raw["categories"]]
    for key in ("banks", "pdq_banks"):  # the copy lives in a temporary folder: absolute bank paths
        for ref in single.get(key) or ():
            ref["path"] = str((loaded.path.parent / ref["path"]).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="moderator-templates-"))
    single_path = tmp / "single-template.yaml"
    out: dict = {"images": len(items), "ensemble_templates": loaded.doc.templates,
                 "single_template": loaded.doc.templates[0], "categories": {}}
    try:
        single_path.write_text(yaml.safe_dump(single, sort_keys=False))
        for name, path in (("ensemble", policy_path), ("single", single_path)):
            clf = Classifier(model_dir, path)
            scores = score_images(clf, items)
            for j, cc in enumerate(clf.engine.policy.categories):
                pos = np.array([cc.cat.id in it.categories for it in items])
                if not pos.any():
                    continue
                entry = out["categories"].setdefault(cc.cat.id, {})
                entry[name] = {"flag": at(scores[:, j], pos, cc.cat.thresholds.flag),
                               "escalate": at(scores[:, j], pos, cc.cat.thresholds.escalate)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
