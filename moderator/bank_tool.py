"""``moderator bank``: build and edit image-bank files offline (decode -> encode -> bank file).

The worker only reads banks (``decide/banks.py``); this module writes them, with the
same hostile-input-safe decoder and the same exported image encoder the worker serves,
so a banked embedding is what the worker computes for those bytes. Inputs are an image
folder (ids are the paths relative to it) or a JSON Lines file with ``path`` and
optional ``id``, ``label``, ``source`` per line (paths relative to the file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from moderator.classify import decode_file, expand_paths
from moderator.decide.banks import Bank, read_bank, read_json_lines, utc_now, write_bank
from moderator.decode import DecodeLimits
from moderator.encode import ImageEncoder, ModelDirectory
from moderator.errors import BankError, InputError, ModeratorError
from moderator.progress import progress_bar
from moderator.schemas import BankItem, BankManifest


@dataclass(frozen=True)
class Source:
    """One image to bank."""

    path: Path
    id: str
    label: str | None = None
    source: str | None = None
    where: str = ""  # "file:line" for JSONL inputs, for error messages


@dataclass
class BankReport:
    path: Path
    added: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {"id", "where", "reason", "error"}
    removed: list[str] = field(default_factory=list)
    count: int = 0

    def as_dict(self) -> dict:
        return {"bank": str(self.path), "count": self.count, "added": len(self.added), "removed": self.removed,
                "failed": self.failed}


def sources_from_dir(folder: Path, label: str | None = None, source: str | None = None) -> list[Source]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BankError(f"{folder}: not a directory")
    return [Source(p, p.relative_to(folder).as_posix(), label, source or str(p)) for p in expand_paths([folder])]


def sources_from_jsonl(jsonl: Path, label: str | None = None, source: str | None = None) -> list[Source]:
    jsonl = Path(jsonl)
    out = []
    for lineno, obj in read_json_lines(jsonl):
        where = f"{jsonl}:{lineno}"
        path = obj.get("path")
        if not isinstance(path, str) or not path:
            raise BankError(f"{where}: each line needs a \"path\" (string)")
        for key in ("id", "label", "source"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise BankError(f"{where}: \"{key}\" must be a string")
        full = Path(path) if Path(path).is_absolute() else jsonl.parent / path
        out.append(Source(full, obj.get("id") or path, obj.get("label") or label,
                          obj.get("source") or source or path, where))
    return out


class BankBuilder:
    """Embeds images for a bank with the model the worker serves."""

    def __init__(self, model_dir: Path | str, *, limits: DecodeLimits = DecodeLimits(), batch_size: int = 32,
                 progress: bool | None = None, jpeg_draft: bool = True) -> None:
        self.model_dir = ModelDirectory(model_dir)
        self.encoder = ImageEncoder(self.model_dir)
        self.limits = limits
        self.batch_size = batch_size
        self.progress = progress
        h, w = self.encoder.preprocessor.image_size  # decode as the worker does (MODERATOR_JPEG_DRAFT)
        self.draft = (w, h) if jpeg_draft else None

    def embed(self, sources: list[Source], report: BankReport,
              taken: set[str]) -> tuple[list[BankItem], np.ndarray]:
        items: list[BankItem] = []
        rows: list[np.ndarray] = []
        batch: list[tuple[Source, object]] = []
        bar = progress_bar(len(sources), "embedding", "img", self.progress)

        def flush() -> None:
            if batch:
                emb = self.encoder.encode([d.image for _, d in batch])
                now = utc_now()
                for (src, d), e in zip(batch, emb):
                    items.append(BankItem(id=src.id, label=src.label, source=src.source, added_at=now,
                                          sha256=d.sha256))
                    rows.append(e)
                    report.added.append(src.id)
                bar.update(len(batch))
                batch.clear()

        try:
            for src in sources:
                try:
                    if not src.id or len(src.id) > 512:
                        raise InputError(f"id must be 1 to 512 characters, got {len(src.id)}", reason="invalid_id")
                    if src.id in taken:
                        raise InputError(f"id {src.id!r} is already in the bank (remove it first)",
                                         reason="duplicate_id")
                    decoded = decode_file(src.path, self.limits, self.draft)
                except ModeratorError as e:
                    report.failed.append({"id": src.id, "where": src.where or str(src.path), "reason": e.reason,
                                          "error": str(e)})
                    bar.update(1)
                    continue
                taken.add(src.id)
                batch.append((src, decoded))
                if len(batch) >= self.batch_size:
                    flush()
            flush()
        finally:
            bar.close()
        dim = self.model_dir.manifest.embed_dim
        return items, (np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32))

    def build(self, out: Path, name: str, sources: list[Source], *, overwrite: bool = False) -> BankReport:
        out = Path(out)
        if out.exists() and not overwrite:
            raise BankError(f"{out}: exists; use `moderator bank add` to extend it, or --overwrite")
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):  # checked before minutes of embedding
            raise BankError(f"bank name {name!r} must match [a-z][a-z0-9_]{{0,63}} (a policy refers to it): "
                            "use --name")
        report = BankReport(out)
        items, emb = self.embed(sources, report, set())
        now = utc_now()
        m = self.model_dir.manifest
        manifest = BankManifest(name=name, model_sha256=self.model_dir.model_sha256, model_architecture=m.architecture,
                                embed_dim=m.embed_dim, count=len(items), created_at=now, updated_at=now)
        write_bank(out, manifest, items, emb)
        report.count = len(items)
        return report

    def add(self, bank_file: Path, sources: list[Source]) -> BankReport:
        bank = read_bank(bank_file)
        if bank.manifest.model_sha256 != self.model_dir.model_sha256:
            raise BankError(f"{bank_file}: bank was built for model {bank.manifest.model_sha256[:12]}, "
                            f"not {self.model_dir.model_sha256[:12]} (--model-dir)")
        report = BankReport(Path(bank_file))
        items, emb = self.embed(sources, report, {i.id for i in bank.items})
        all_items = [*bank.items, *items]
        write_bank(bank_file, bank.manifest.model_copy(update={"updated_at": utc_now()}), all_items,
                   np.concatenate([bank.embeddings, emb]))
        report.count = len(all_items)
        return report


def remove(bank_file: Path, ids: Iterable[str]) -> BankReport:
    bank = read_bank(bank_file)
    drop = set(ids)
    unknown = sorted(drop - {i.id for i in bank.items})
    if unknown:
        raise BankError(f"{bank_file}: no item(s) {unknown}")
    keep = [r for r, item in enumerate(bank.items) if item.id not in drop]
    write_bank(bank_file, bank.manifest.model_copy(update={"updated_at": utc_now()}),
               [bank.items[r] for r in keep], bank.embeddings[keep])
    report = BankReport(Path(bank_file), removed=sorted(drop))
    report.count = len(keep)
    return report


def info(bank: Bank) -> dict:
    labels: dict[str, int] = {}
    for item in bank.items:
        labels[item.label or ""] = labels.get(item.label or "", 0) + 1
    return {"path": str(bank.path), "sha256": bank.sha256, **bank.manifest.model_dump(),
            "with_sha256": len(bank.by_sha256), "labels": labels}
