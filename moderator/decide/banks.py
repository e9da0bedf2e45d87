"""Image banks: known-bad and allow-list images, stored as embeddings, matched in the decide stage.

A bank file is one ``.npz`` (numpy's zip of arrays, read with ``allow_pickle=False``):

- ``embeddings``: float32 ``(count, embed_dim)``, L2-normalised rows, one per item;
- ``manifest``: the ``BankManifest`` JSON (name, the model's sha256 and width) as UTF-8 bytes;
- ``items``: the ``BankItem`` list as JSON Lines (UTF-8 bytes), row ``i`` describes embedding ``i``.

One file, so a bank is replaced atomically (written beside, then renamed; a ConfigMap swaps its
symlink) and a hot reload never sees half of one. Matching reuses the embedding the worker
computed for the policy's categories: no second encode. Search is exact (one matrix product
per batch, in column blocks so memory stays bounded); ``moderator bank bench`` measures it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from moderator.errors import BankError
from moderator.schemas import BANK_FORMAT, BankItem, BankManifest

_BLOCK = 65_536  # bank rows per matrix product: (batch x 65,536) float32 scores at most


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fingerprint(path: Path) -> tuple[int, int, int] | None:
    """What the policy watcher compares to see a bank file change without reading it
    (inode, size, mtime; ``stat`` follows a ConfigMap's symlink swap)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _normalise(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if in_place and x.flags.writeable:  # a freshly loaded array: no second copy of a large bank
        x /= norms
        return x
    return x / norms


@dataclass(frozen=True)
class Bank:
    """A loaded bank: immutable, shared by every batch until a reload replaces it."""

    path: Path
    manifest: BankManifest
    items: tuple[BankItem, ...]
    embeddings: np.ndarray  # (count, dim), float32, rows L2-normalised
    sha256: str  # of the file's bytes: what was audited is what was loaded
    by_sha256: dict[str, int]  # original file sha256 -> row

    @property
    def name(self) -> str:
        return self.manifest.name

    def __len__(self) -> int:
        return len(self.items)

    def best(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row of ``x`` (L2-normalised, (n, dim)): the most similar item's row and cosine."""
        n = x.shape[0]
        best_sim = np.full(n, -np.inf, dtype=np.float32)
        best_row = np.full(n, -1, dtype=np.int64)
        if not len(self):
            return best_row, best_sim
        x = np.ascontiguousarray(x, dtype=np.float32)
        for start in range(0, len(self), _BLOCK):
            sims = x @ self.embeddings[start:start + _BLOCK].T
            rows = sims.argmax(axis=1)
            vals = sims[np.arange(n), rows]
            better = vals > best_sim
            best_sim[better] = vals[better]
            best_row[better] = rows[better] + start
        return best_row, best_sim


def _member(npz, name: str, path: Path) -> np.ndarray:
    if name not in npz.files:
        raise BankError(f"{path}: not a moderator bank file: no {name!r} array (has {sorted(npz.files)})")
    return npz[name]


def read_bank(path: Path | str) -> Bank:
    """Load and check a bank file; every problem is a ``BankError`` naming the file (and line)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BankError(f"{path}: cannot read bank file: {e.strerror or e}") from e
    digest = hashlib.sha256(raw).hexdigest()
    if not raw.startswith(b"PK"):  # np.load would take a bare .npy (or refuse a pickle) instead
        raise BankError(f"{path}: not a moderator bank file (an .npz zip written by `moderator bank`), "
                        "or truncated to nothing")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            manifest_raw = _member(npz, "manifest", path)
            items_raw = _member(npz, "items", path)
            emb = _member(npz, "embeddings", path)
    except BankError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError, zipfile.LargeZipFile, zlib.error,
            TypeError) as e:
        raise BankError(f"{path}: not a readable bank file (corrupt or truncated?): {e}") from e
    del raw
    try:
        manifest = BankManifest.model_validate_json(manifest_raw.tobytes())
    except ValidationError as e:
        first = e.errors()[0]
        raise BankError(f"{path}: invalid bank manifest: {'.'.join(map(str, first['loc']))}: {first['msg']}") from e
    if manifest.format != BANK_FORMAT:
        raise BankError(f"{path}: bank format {manifest.format} is not supported (this moderator reads {BANK_FORMAT})")
    items: list[BankItem] = []
    try:
        text = items_raw.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BankError(f"{path}: bank items are not UTF-8: {e}") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(BankItem.model_validate_json(line))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"])) or "line"
            raise BankError(f"{path}: items line {lineno}: {where}: {first['msg']}") from e
    if emb.dtype != np.float32 or emb.ndim != 2:
        raise BankError(f"{path}: embeddings must be a float32 matrix, got {emb.dtype} {emb.shape}")
    if emb.shape[0] != len(items) or manifest.count != len(items):
        raise BankError(f"{path}: {emb.shape[0]} embeddings, {len(items)} items and a manifest count of "
                        f"{manifest.count} must all agree")
    if emb.shape[1] != manifest.embed_dim:
        raise BankError(f"{path}: embeddings are {emb.shape[1]} wide, the manifest says {manifest.embed_dim}")
    if not np.isfinite(emb).all():
        raise BankError(f"{path}: embeddings hold NaN or infinite values")
    seen: dict[str, int] = {}
    by_sha: dict[str, int] = {}
    for row, item in enumerate(items):
        if item.id in seen:
            raise BankError(f"{path}: item id {item.id!r} appears twice (rows {seen[item.id]} and {row})")
        seen[item.id] = row
        if item.sha256:
            by_sha.setdefault(item.sha256, row)
    return Bank(path, manifest, tuple(items), _normalise(emb, in_place=True), digest, by_sha)


def write_bank(path: Path | str, manifest: BankManifest, items: list[BankItem], embeddings: np.ndarray) -> Path:
    """Write a bank file atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    emb = _normalise(embeddings.reshape(len(items), manifest.embed_dim) if len(items) else
                     np.zeros((0, manifest.embed_dim), np.float32))
    manifest = manifest.model_copy(update={"count": len(items)})
    items_bytes = "".join(item.model_dump_json(exclude_none=True) + "\n" for item in items).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes 0600; a worker running as another user must still read the bank
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, embeddings=emb, manifest=np.frombuffer(manifest.model_dump_json().encode(), np.uint8),
                     items=np.frombuffer(items_bytes, np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


class FileCache:
    """Loaded bank files by path as the policy names them, reused while the file is unchanged
    (inode, size, mtime: a policy edit does not re-read a 2 GB bank). ``retain`` records which
    banks each policy file (the live one, the shadow one) lists now and drops the banks no policy
    lists, so replaced and removed banks are freed and one policy's reload never evicts the
    other's."""

    def __init__(self, read) -> None:
        self._read = read
        self._loaded: dict[str, tuple[tuple[int, int, int] | None, object]] = {}
        self._lists: dict[str, set[str]] = {}  # policy file -> the bank paths it lists
        self._lock = threading.Lock()

    def load(self, path: Path):
        key, fp = str(path), fingerprint(path)
        with self._lock:
            hit = self._loaded.get(key)
        if hit is not None and fp is not None and hit[0] == fp:
            return hit[1]
        bank = self._read(path)
        with self._lock:
            self._loaded[key] = (fp, bank)
        return bank

    def retain(self, policy: object, paths) -> None:
        with self._lock:
            self._lists[str(policy)] = {str(p) for p in paths}
            keep = set().union(*self._lists.values())
            for key in [k for k in self._loaded if k not in keep]:
                del self._loaded[key]


class BankLoader(FileCache):
    def __init__(self) -> None:
        super().__init__(read_bank)


def check_model(bank: Bank, model_sha256: str, embed_dim: int, name: str | None = None) -> None:
    m = bank.manifest
    if m.model_sha256 != model_sha256:
        raise BankError(f"{bank.path}: bank {m.name!r} was built for model {m.model_sha256[:12]} "
                        f"({m.model_architecture}), not for the model in use ({model_sha256[:12]}); rebuild it "
                        "with `moderator bank build --model-dir <this model>`")
    if m.embed_dim != embed_dim:
        raise BankError(f"{bank.path}: bank embeddings are {m.embed_dim} wide, the model's are {embed_dim}")
    if name is not None and m.name != name:
        raise BankError(f"{bank.path}: the policy calls this bank {name!r} but the file holds bank {m.name!r}")


def read_json_lines(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line; a bad line is a ``BankError`` naming it."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BankError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BankError(f"{path}: line {lineno}: not JSON: {e.msg}") from e
        if not isinstance(obj, dict):
            raise BankError(f"{path}: line {lineno}: expected a JSON object")
        out.append((lineno, obj))
    return out
