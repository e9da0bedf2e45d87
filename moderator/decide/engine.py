"""Scoring and decisions.

Scoring rule (the default, and so far the only one): **per-category scores with
per-category thresholds**, as the Stable Diffusion safety checker does, never a
softmax across categories. A category's score depends only on the image and that
category's own prompts, so adding, removing or editing another category can't
move it, and thresholds calibrated once stay meaningful across policy edits.

- Without contrast prompts: ``score = max over the category's prompts of
  cos(image, prompt)``, each prompt embedded as a template ensemble.
- With contrast prompts (benign look-alikes, e.g. "a kitchen knife on a cutting
  board" for weapons): ``score = softmax(logit_scale * [s_cat, s_contrast...])[0]``,
  the probability, under the model's own temperature, that the image is the
  category rather than one of *its own* contrasts. Still independent of every
  other category; thresholds are then probabilities.

Bands: ``score >= flag`` -> flag; ``escalate <= score < flag`` -> escalate;
otherwise allow. A parent category takes the most severe action of its children
(taxonomy roll-up). The overall action is the most severe across categories.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np

from moderator import metrics
from moderator.decide.embeddings import EmbeddingCache, InProcessCache, PolicyEmbeddings, policy_embeddings
from moderator.decide.policy import LoadedPolicy
from moderator.schemas import ACTION_SEVERITY, Action, Category, CategoryScore, Decision


@dataclass(frozen=True)
class _CompiledCategory:
    cat: Category
    rows: np.ndarray  # (k, D) positive prompts
    contrast: np.ndarray | None  # (m, D)


@dataclass(frozen=True)
class CompiledPolicy:
    loaded: LoadedPolicy
    embeddings: PolicyEmbeddings
    categories: tuple[_CompiledCategory, ...]
    children: dict[str, tuple[str, ...]]
    logit_scale: float

    @property
    def version(self) -> str:
        return self.loaded.doc.version

    def scores(self, image_embeddings: np.ndarray) -> np.ndarray:
        """(N, C) scores for the enabled categories, in policy order."""
        x = np.asarray(image_embeddings, dtype=np.float32)
        out = np.empty((x.shape[0], len(self.categories)), dtype=np.float32)
        for j, cc in enumerate(self.categories):
            pos = (x @ cc.rows.T).max(axis=1)
            if cc.contrast is None:
                out[:, j] = pos
            else:
                logits = self.logit_scale * np.concatenate([pos[:, None], x @ cc.contrast.T], axis=1)
                logits -= logits.max(axis=1, keepdims=True)
                e = np.exp(logits)
                out[:, j] = e[:, 0] / e.sum(axis=1)
        return out


def compile_policy(
    loaded: LoadedPolicy,
    model_sha256: str,
    logit_scale: float,
    text_encoder: Callable[[], object],
    cache: EmbeddingCache | None = None,
) -> CompiledPolicy:
    doc = loaded.doc
    emb = policy_embeddings(doc, model_sha256, text_encoder, cache or InProcessCache())
    compiled = []
    for c in doc.categories:
        if not c.enabled:
            continue
        templates = tuple(c.templates if c.templates is not None else doc.templates)
        compiled.append(_CompiledCategory(
            c, emb.rows(c.prompts, templates),
            emb.rows(c.contrast_prompts, templates) if c.contrast_prompts else None,
        ))
    children: dict[str, list[str]] = {}
    enabled = {cc.cat.id for cc in compiled}
    for cc in compiled:
        if cc.cat.parent in enabled:
            children.setdefault(cc.cat.parent, []).append(cc.cat.id)
    return CompiledPolicy(loaded, emb, tuple(compiled), {k: tuple(v) for k, v in children.items()},
                          float(logit_scale))


def _band(score: float, cat: Category) -> Action:
    if cat.thresholds.flag is not None and score >= cat.thresholds.flag:
        return "flag"
    if score >= cat.thresholds.escalate:
        return "escalate"
    return "allow"


def audit_draw(event_id: str, category_id: str) -> float:
    """A uniform number in [0, 1) fixed by (event id, category): audits are reproducible."""
    h = hashlib.sha256(f"audit\0{category_id}\0{event_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass(frozen=True)
class ModelInfo:
    sha256: str
    architecture: str


class DecisionEngine:
    """Holds the policy in force (swapped atomically on reload) and decides batches."""

    def __init__(self, policy: CompiledPolicy, model: ModelInfo) -> None:
        self._policy = policy
        self.model = model
        self._swap_lock = threading.Lock()
        metrics.POLICY_LOADED.set(1)
        self._publish_info()

    @property
    def policy(self) -> CompiledPolicy:
        return self._policy

    def swap(self, policy: CompiledPolicy) -> None:
        with self._swap_lock:
            self._policy = policy  # one reference assignment: readers see old or new, never a mix
        self._publish_info()

    def _publish_info(self) -> None:
        p = self._policy
        metrics.POLICY_INFO.info({"version": p.version, "sha256": p.loaded.sha256,
                                  "categories": str(len(p.categories))})

    def decide(
        self,
        event_ids: Sequence[str],
        image_embeddings: np.ndarray,
        *,
        image_sha256: Sequence[str | None] | None = None,
        timings_ms: Sequence[dict[str, float]] | None = None,
        metadata: Sequence[dict | None] | None = None,
    ) -> list[Decision]:
        policy = self._policy  # one snapshot for the whole batch
        t0 = time.perf_counter()
        scores = policy.scores(image_embeddings)
        score_ms = (time.perf_counter() - t0) * 1000 / max(1, len(event_ids))
        metrics.SCORE_SECONDS.observe(time.perf_counter() - t0)
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        out = []
        for i, event_id in enumerate(event_ids):
            timings = {**(timings_ms[i] if timings_ms else {}), "score": round(score_ms, 3)}
            out.append(self._decide_one(
                policy, event_id, scores[i],
                image_sha256[i] if image_sha256 else None, timings,
                metadata[i] if metadata else None, now,
            ))
        return out

    def _decide_one(self, policy: CompiledPolicy, event_id: str, row: np.ndarray,
                    image_sha: str | None, timings: dict, metadata: dict | None, now: str) -> Decision:
        own: dict[str, Action] = {}
        for cc, s in zip(policy.categories, row):
            own[cc.cat.id] = _band(float(s), cc.cat)
        reasons: list[str] = []
        final = dict(own)
        for cc, s in zip(policy.categories, row):
            c = cc.cat
            if own[c.id] != "allow":
                th = c.thresholds.flag if own[c.id] == "flag" else c.thresholds.escalate
                reasons.append(f"{own[c.id]}:{c.id} score {float(s):.4f} >= {th}")

        def rolled(cid: str) -> Action:  # parent inherits its children's severity
            best = own[cid]
            for child in policy.children.get(cid, ()):
                a = rolled(child)
                if ACTION_SEVERITY[a] > ACTION_SEVERITY[best]:
                    best = a
            return best

        for cid, kids in policy.children.items():
            r = rolled(cid)
            if ACTION_SEVERITY[r] > ACTION_SEVERITY[own[cid]]:
                final[cid] = r
                reasons.append(f"{r}:{cid} via child category")

        overall: Action = max(final.values(), key=ACTION_SEVERITY.__getitem__)
        if overall == "allow":
            for cc in policy.categories:
                rate = cc.cat.audit_sample_rate
                if rate > 0 and audit_draw(event_id, cc.cat.id) < rate:
                    overall = "escalate"
                    reasons.append(f"audit_sample:{cc.cat.id}")
                    break

        cats = []
        best_key, top = None, None
        for cc, s in zip(policy.categories, row):
            c = cc.cat
            a = final[c.id]
            margin = float(s) - c.thresholds.escalate
            key = (ACTION_SEVERITY[own[c.id]], ACTION_SEVERITY[a], margin)
            if best_key is None or key > best_key:
                best_key, top = key, c.id
            cats.append(CategoryScore(id=c.id, label=c.label, parent=c.parent, score=round(float(s), 6), action=a))
            if a != "allow":
                metrics.CATEGORY_ACTIONS.labels(category=c.id, action=a).inc()
        metrics.DECISIONS.labels(action=overall).inc()
        return Decision(
            event_id=event_id, action=overall, top_category=top, reasons=reasons, categories=cats,
            policy_version=policy.version, policy_sha256=policy.loaded.sha256,
            model_sha256=self.model.sha256, model_architecture=self.model.architecture,
            image_sha256=image_sha, timings_ms=timings, metadata=metadata, decided_at=now,
        )


class PolicyCompiler:
    """Compiles policies for one exported model; what both the worker and ``classify`` wire.

    Binds the model's identity and temperature, the prompt-embedding cache and a
    text-encoder factory (only called on a cache miss), so a reload is ``compiler(loaded)``.
    """

    def __init__(self, model_dir, cache: EmbeddingCache, text_encoder: Callable[[], object]) -> None:
        self.model_dir = model_dir
        self.cache = cache
        self.text_encoder = text_encoder

    def __call__(self, loaded: LoadedPolicy) -> CompiledPolicy:
        return compile_policy(loaded, self.model_dir.model_sha256, self.model_dir.manifest.logit_scale,
                              self.text_encoder, self.cache)

    def engine(self, loaded: LoadedPolicy) -> DecisionEngine:
        m = self.model_dir
        return DecisionEngine(self(loaded), ModelInfo(m.model_sha256, m.manifest.architecture))
