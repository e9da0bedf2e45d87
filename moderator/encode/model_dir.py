"""An exported model directory: ``manifest.json`` plus the files it lists."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from moderator.errors import ChecksumMismatch, ManifestError, ModelError
from moderator.schemas import Manifest

MANIFEST_FILE = "manifest.json"


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``out_dir`` to build a model directory in. When the
    block ends normally it replaces ``out_dir`` (one rename: a reader never sees a half-written
    directory at that path); on any error it is removed and ``out_dir`` is left as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_sha256_of(files: dict[str, str]) -> str:
    """The model's identity: a digest over the digests of its files (manifest excluded).

    Independent of export time and of the order files were written, so two exports
    of the same weights with the same tools share an id.
    """
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()


class ModelDirectory:
    """A validated model directory. ``verify=True`` re-hashes every file."""

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ModelError(
                f"{self.path} is not a model directory: {MANIFEST_FILE} is missing "
                "(create one with `moderator export`)"
            )
        try:
            self.manifest = Manifest.model_validate_json(manifest_path.read_bytes())
        except ValidationError as e:
            raise ManifestError(f"{manifest_path}: invalid manifest:\n{e}") from e
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"{manifest_path}: unreadable: {e}") from e
        for required in (self.manifest.image_encoder.file, self.manifest.text_encoder.file,
                         self.manifest.tokenizer.file):
            if required not in self.manifest.files:
                raise ManifestError(f"{manifest_path}: {required} is used but not listed in files")
        if verify:
            self.verify()

    def verify(self) -> None:
        for name, expected in self.manifest.files.items():
            p = self.file(name)
            if not p.is_file():
                raise ModelError(f"{self.path}: file {name} listed in the manifest is missing")
            actual = sha256_file(p)
            if actual != expected:
                raise ChecksumMismatch(
                    f"{self.path}/{name}: sha256 {actual} does not match the manifest ({expected})"
                )

    def file(self, name: str) -> Path:
        p = (self.path / name).resolve()
        if self.path.resolve() not in p.parents:
            raise ManifestError(f"{self.path}: manifest names a file outside the directory: {name}")
        return p

    @cached_property
    def model_sha256(self) -> str:
        return model_sha256_of(self.manifest.files)

    def describe(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path),
            "model_sha256": self.model_sha256,
            "architecture": m.architecture,
            "weights": m.weights.model_dump(exclude_none=True),
            "precision": m.precision,
            "embed_dim": m.embed_dim,
            "image_size": list(m.preprocess.image_size),
        }
