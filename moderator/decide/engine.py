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

Banks (``decide/banks.py``) come after the categories, on the same embedding: a
known-bad bank match raises the overall action to the bank's action (``bank:<name>``);
otherwise an allow-bank match turns a flag or escalate into allow (``allow_bank:<name>``)
unless a category that acted is ``never_overridable``. Audit sampling skips
allow-listed images.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from moderator import metrics
from moderator.decide.banks import Bank, BankLoader, check_model
from moderator.decide.pdq import PdqBank, PdqLoader
from moderator.decide.embeddings import EmbeddingCache, InProcessCache, PolicyEmbeddings, policy_embeddings
from moderator.decide.policy import LoadedPolicy
from moderator.schemas import (ACTION_SEVERITY, Action, BankMatch, BankRef, Category, CategoryScore, Decision,
                               PdqBankRef)


@dataclass(frozen=True)
class _CompiledCategory:
    cat: Category
    rows: np.ndarray  # (k, D) positive prompts
    contrast: np.ndarray | None  # (m, D)


@dataclass(frozen=True)
class _CompiledBank:
    ref: BankRef
    bank: Bank

    def sha_row(self, image_sha256: str | None) -> int | None:
        """The row of the banked file with exactly these bytes, when the bank matches by sha256."""
        if not self.ref.match_sha256 or not image_sha256:
            return None
        return self.bank.by_sha256.get(image_sha256)


@dataclass(frozen=True)
class _CompiledPdq:
    ref: PdqBankRef
    bank: PdqBank


@dataclass(frozen=True)
class _Hit:
    """An image's best match in one bank (embedding or PDQ)."""

    bank: str
    kind: str  # known_bad | allow
    action: Action  # what a known-bad match does; "allow" for allow banks
    item_id: str
    label: str | None
    similarity: float
    detail: str  # the reason's tail: how it matched
    by_sha256: bool = False
    method: str = "embedding"
    distance: int | None = None

    @property
    def prefix(self) -> str:
        return ("pdq" if self.method == "pdq" else "bank") if self.kind == "known_bad" else "allow_bank"


def _embedding_hit(cb: _CompiledBank, row: int, sim: float, by_sha256: bool) -> _Hit:
    item = cb.bank.items[row]
    detail = (f"item {item.id} (same file, sha256)" if by_sha256 else
              f"item {item.id} similarity {sim:.4f} >= {cb.ref.threshold}")
    return _Hit(cb.ref.name, cb.ref.kind, cb.ref.action if cb.ref.kind == "known_bad" else "allow", item.id,
                item.label, sim, detail, by_sha256)


@dataclass(frozen=True)
class CompiledPolicy:
    loaded: LoadedPolicy
    embeddings: PolicyEmbeddings
    categories: tuple[_CompiledCategory, ...]
    children: dict[str, tuple[str, ...]]
    logit_scale: float
    banks: tuple[_CompiledBank, ...] = ()
    pdq_banks: tuple[_CompiledPdq, ...] = ()

    @property
    def version(self) -> str:
        return self.loaded.doc.version

    def bank_embedding(self, image_sha256: str | None) -> np.ndarray | None:
        """The stored embedding of a banked file with these exact bytes (``match_sha256`` banks):
        the worker skips the encoder for it."""
        for cb in self.banks:
            row = cb.sha_row(image_sha256)
            if row is not None:
                return cb.bank.embeddings[row].copy()
        return None

    def bank_hits(self, image_embeddings: np.ndarray,
                  image_sha256: Sequence[str | None] | None) -> list[list[_Hit]]:
        """Per image, its best match in each bank that it matches (cosine >= threshold, or sha256)."""
        n = image_embeddings.shape[0]
        out: list[list[_Hit]] = [[] for _ in range(n)]
        for cb in self.banks:
            rows, sims = cb.bank.best(image_embeddings)
            for i in range(n):
                sha_row = cb.sha_row(image_sha256[i] if image_sha256 else None)
                if sha_row is not None:
                    sim = float(image_embeddings[i] @ cb.bank.embeddings[sha_row])
                    out[i].append(_embedding_hit(cb, sha_row, sim, True))
                elif rows[i] >= 0 and sims[i] >= cb.ref.threshold:
                    out[i].append(_embedding_hit(cb, int(rows[i]), float(sims[i]), False))
        return out

    @property
    def needs_pdq(self) -> bool:
        """Whether images need a PDQ hash for this policy (it lists PDQ banks)."""
        return bool(self.pdq_banks)

    def pdq_hits(self, pdq: Sequence[tuple[bytes, int] | None]) -> list[list[_Hit]]:
        """Per image, its nearest row in each PDQ bank within the bank's distance (images without a
        hash, or below a bank's ``min_quality``, match nothing)."""
        out: list[list[_Hit]] = [[] for _ in pdq]
        have = [i for i, h in enumerate(pdq) if h is not None]
        if not have:
            return out
        query = np.stack([np.frombuffer(pdq[i][0], dtype=np.uint8) for i in have])
        for cp in self.pdq_banks:
            rows, dists = cp.bank.best(query)
            for j, i in enumerate(have):
                quality = pdq[i][1]
                if rows[j] < 0 or dists[j] > cp.ref.max_distance or quality < cp.ref.min_quality:
                    continue
                r, d = int(rows[j]), int(dists[j])
                out[i].append(_Hit(cp.ref.name, "known_bad", cp.ref.action, cp.bank.ids[r], cp.bank.labels[r],
                                   1 - d / 256, f"item {cp.bank.ids[r]} distance {d} <= {cp.ref.max_distance} "
                                   f"(quality {quality})", method="pdq", distance=d))
        return out

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


def bank_path(loaded: LoadedPolicy, ref: BankRef | PdqBankRef) -> Path:
    """A bank's file: absolute as written, else relative to the policy file's folder."""
    p = Path(ref.path)
    if p.is_absolute() or loaded.path is None:
        return p
    return loaded.path.parent / p


def compile_policy(
    loaded: LoadedPolicy,
    model_sha256: str,
    logit_scale: float,
    text_encoder: Callable[[], object],
    cache: EmbeddingCache | None = None,
    *,
    embed_dim: int | None = None,
    banks: BankLoader | None = None,
    pdq_banks: PdqLoader | None = None,
) -> CompiledPolicy:
    doc = loaded.doc
    loader = banks or BankLoader()
    compiled_banks = []
    for ref in doc.banks:  # the cheap checks first: a bad bank fails before any text encoding
        bank = loader.load(bank_path(loaded, ref))
        check_model(bank, model_sha256, embed_dim if embed_dim is not None else bank.manifest.embed_dim, ref.name)
        compiled_banks.append(_CompiledBank(ref, bank))
    compiled_pdq = []
    if doc.pdq_banks:
        from moderator.decode.pdq import available  # noqa: PLC0415

        available()  # the pdq extra is installed, or the policy is refused now
        pdq_loader = pdq_banks or PdqLoader()
        compiled_pdq = [_CompiledPdq(ref, pdq_loader.load(bank_path(loaded, ref))) for ref in doc.pdq_banks]
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
                          float(logit_scale), tuple(compiled_banks), tuple(compiled_pdq))


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

    def __init__(self, policy: CompiledPolicy, model: ModelInfo, *, shadow: bool = False) -> None:
        self._policy = policy
        self.model = model
        self.shadow = shadow  # a shadow engine's decisions are marked and kept out of the live metrics
        self._swap_lock = threading.Lock()
        if not shadow:
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
        info = {"version": p.version, "sha256": p.loaded.sha256, "categories": str(len(p.categories)),
                "banks": ",".join(f"{cb.ref.name}:{len(cb.bank)}" for cb in p.banks)}
        (metrics.SHADOW_POLICY_INFO if self.shadow else metrics.POLICY_INFO).info(info)

    def decide(
        self,
        event_ids: Sequence[str],
        image_embeddings: np.ndarray,
        *,
        image_sha256: Sequence[str | None] | None = None,
        timings_ms: Sequence[dict[str, float]] | None = None,
        metadata: Sequence[dict | None] | None = None,
        pdq: Sequence[tuple[bytes, int] | None] | None = None,
    ) -> list[Decision]:
        """``pdq``: each image's (PDQ hash, quality), or None, when the policy lists PDQ banks."""
        policy = self._policy  # one snapshot for the whole batch
        t0 = time.perf_counter()
        scores = policy.scores(image_embeddings)
        hits = policy.bank_hits(np.asarray(image_embeddings, dtype=np.float32), image_sha256) if policy.banks \
            else None
        if policy.pdq_banks and pdq is not None:
            extra = policy.pdq_hits(pdq)
            hits = [a + b for a, b in zip(hits, extra)] if hits else extra
        if not self.shadow:
            metrics.SCORE_SECONDS.observe(time.perf_counter() - t0)
        score_ms = (time.perf_counter() - t0) * 1000 / max(1, len(event_ids))
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        out = []
        for i, event_id in enumerate(event_ids):
            timings = {**(timings_ms[i] if timings_ms else {}), "score": round(score_ms, 3)}
            out.append(self._decide_one(
                policy, event_id, scores[i],
                image_sha256[i] if image_sha256 else None, timings,
                metadata[i] if metadata else None, now, hits[i] if hits else (),
            ))
        return out

    def _decide_one(self, policy: CompiledPolicy, event_id: str, row: np.ndarray,
                    image_sha: str | None, timings: dict, metadata: dict | None, now: str,
                    hits: Sequence[_Hit] = ()) -> Decision:
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
        overall, matches = self._apply_banks(policy, hits, overall, final, reasons)
        if overall == "allow" and not any(m.kind == "allow" for m in matches):
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
            if a != "allow" and not self.shadow:
                metrics.CATEGORY_ACTIONS.labels(category=c.id, action=a).inc()
        if not self.shadow:
            metrics.DECISIONS.labels(action=overall).inc()
        return Decision(
            event_id=event_id, action=overall, top_category=top, reasons=reasons, categories=cats,
            policy_version=policy.version, policy_sha256=policy.loaded.sha256,
            model_sha256=self.model.sha256, model_architecture=self.model.architecture,
            image_sha256=image_sha, timings_ms=timings, metadata=metadata, decided_at=now,
            bank_matches=matches, shadow=self.shadow,
        )

    def _apply_banks(self, policy: CompiledPolicy, hits: Sequence[_Hit], overall: Action,
                     final: dict[str, Action], reasons: list[str]) -> tuple[Action, list[BankMatch]]:
        """Known-bad matches raise the action; else an allow match lowers a flag/escalate to allow."""
        if not hits:
            return overall, []
        matches: list[BankMatch] = []
        bad = [h for h in hits if h.kind == "known_bad"]

        def record(h: _Hit, applied: bool) -> None:
            matches.append(BankMatch(bank=h.bank, kind=h.kind, method=h.method, item_id=h.item_id, label=h.label,
                                     similarity=round(h.similarity, 6), distance=h.distance, by_sha256=h.by_sha256,
                                     applied=applied))
            if not self.shadow:
                metrics.BANK_MATCHES.labels(bank=h.bank, action=h.action, applied=str(applied).lower()).inc()

        for h in bad:
            if ACTION_SEVERITY[h.action] > ACTION_SEVERITY[overall]:
                overall = h.action
            reasons.append(f"{h.prefix}:{h.bank} {h.action} {h.detail}")
            record(h, True)
        cats = {cc.cat.id: cc.cat for cc in policy.categories}
        for h in (h for h in hits if h.kind == "allow"):
            if bad:
                reasons.append(f"allow_bank:{h.bank} not applied: known-bad bank match; {h.detail}")
                record(h, False)
                continue
            locked = sorted(cid for cid, a in final.items() if a != "allow" and cats[cid].never_overridable)
            if overall != "allow" and locked:
                reasons.append(f"allow_bank:{h.bank} not applied: never_overridable {','.join(locked)}; {h.detail}")
                record(h, False)
                continue
            if overall != "allow":
                reasons.append(f"allow_bank:{h.bank} {overall} -> allow {h.detail}")
                overall = "allow"
            else:
                reasons.append(f"allow_bank:{h.bank} {h.detail}")
            record(h, True)
        return overall, matches


class PolicyCompiler:
    """Compiles policies for one exported model; what both the worker and ``classify`` wire.

    Binds the model's identity and temperature, the prompt-embedding cache and a
    text-encoder factory (only called on a cache miss), so a reload is ``compiler(loaded)``.
    """

    def __init__(self, model_dir, cache: EmbeddingCache, text_encoder: Callable[[], object]) -> None:
        self.model_dir = model_dir
        self.cache = cache
        self.text_encoder = text_encoder
        self.banks = BankLoader()  # bank files stay loaded across policy reloads while unchanged
        self.pdq_banks = PdqLoader()

    def __call__(self, loaded: LoadedPolicy) -> CompiledPolicy:
        compiled = compile_policy(loaded, self.model_dir.model_sha256, self.model_dir.manifest.logit_scale,
                                  self.text_encoder, self.cache, embed_dim=self.model_dir.manifest.embed_dim,
                                  banks=self.banks, pdq_banks=self.pdq_banks)
        # the caches keep what each policy file lists now; a replaced or dropped bank is freed with
        # the compiled policy that still references it
        self.banks.retain(loaded.path, (bank_path(loaded, ref) for ref in loaded.doc.banks))
        self.pdq_banks.retain(loaded.path, (bank_path(loaded, ref) for ref in loaded.doc.pdq_banks))
        return compiled

    def engine(self, loaded: LoadedPolicy, *, shadow: bool = False) -> DecisionEngine:
        m = self.model_dir
        return DecisionEngine(self(loaded), ModelInfo(m.model_sha256, m.manifest.architecture), shadow=shadow)
