"""``moderator bank bench``: how long matching one batch against a bank takes, by bank size.

Random L2-normalised embeddings (the cost of exact search does not depend on the
values). Each size is timed on the worker's own code path (``Bank.best``: numpy, exact,
blocked) and, when the ``faiss-cpu`` package is importable, on FAISS's exact
inner-product index (``IndexFlatIP``) and an HNSW index (approximate) for comparison,
all in one run so the figures compare as ratios. (On 2 cores numpy's exact search beat
FAISS's exact index at every size, and HNSW missed planted exact copies: see the README.)
"""

from __future__ import annotations

import time

import numpy as np

from moderator.decide.banks import Bank
from moderator.encode.bench import _rate
from moderator.schemas import BankItem, BankManifest


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _time(fn, seconds: float) -> tuple[float, int]:
    """(seconds per call, calls) over at least ``seconds``: the encoder benchmark's timing loop."""
    rate, calls = _rate(fn, 1, seconds)
    return 1.0 / rate, calls


def _bank(emb: np.ndarray) -> Bank:
    n, dim = emb.shape
    items = tuple(BankItem(id=str(i), added_at="") for i in range(n))
    m = BankManifest(name="bench", model_sha256="0" * 64, model_architecture="random", embed_dim=dim, count=n,
                     created_at="", updated_at="")
    return Bank(path=None, manifest=m, items=items, embeddings=emb, sha256="", by_sha256={})  # type: ignore[arg-type]


def bench_matching(sizes: list[int], *, dim: int = 512, batch: int = 32, seconds: float = 2.0,
                   seed: int = 0, faiss_indexes: bool = True, hnsw: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    queries = _unit(rng, batch, dim)
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        faiss = None
    if not faiss_indexes:
        faiss = None
    rows = []
    for n in sizes:
        emb = _unit(rng, n, dim)
        # plant exact copies so every method must find them: a correctness check, not only a timing
        planted = rng.choice(n, size=min(batch, n), replace=False)
        q = queries.copy()
        q[: len(planted)] = emb[planted]
        bank = _bank(emb)
        per_batch, reps = _time(lambda: bank.best(q), seconds)
        got, _ = bank.best(q)
        row = {"items": n, "dim": dim, "batch": batch, "numpy_exact_ms_per_batch": round(per_batch * 1000, 3),
               "numpy_exact_us_per_image": round(per_batch * 1e6 / batch, 1), "numpy_reps": reps,
               "numpy_found_planted": int((got[: len(planted)] == planted).sum()), "planted": len(planted),
               "bank_mib": round(emb.nbytes / 2**20, 1)}
        if faiss is not None:
            index = faiss.IndexFlatIP(dim)
            index.add(emb)
            per_batch, _ = _time(lambda: index.search(q, 1), seconds)
            row["faiss_flat_ms_per_batch"] = round(per_batch * 1000, 3)
            if hnsw and n >= 10_000:
                t0 = time.perf_counter()
                h = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
                h.hnsw.efSearch = 64
                h.add(emb)
                row["faiss_hnsw_build_s"] = round(time.perf_counter() - t0, 1)
                per_batch, _ = _time(lambda: h.search(q, 1), seconds)
                _, ids = h.search(q, 1)
                row["faiss_hnsw_ms_per_batch"] = round(per_batch * 1000, 3)
                row["faiss_hnsw_found_planted"] = int((ids[: len(planted), 0] == planted).sum())
        rows.append(row)
        del emb, bank
    return rows


def bench_pdq(sizes: list[int], *, seconds: float = 1.0, seed: int = 0) -> list[dict]:
    """PDQ's cost per image: hashing (photo-like JPEG content at several sizes; ``pdq_hash`` first
    shrinks anything above 512 px) and matching one hash against banks of ``sizes`` hashes."""
    from moderator.decode.pdq import MAX_SIDE, pdq_hash  # noqa: PLC0415
    from moderator.decide.pdq import PdqBank  # noqa: PLC0415
    from moderator.worker.bench import gradient_photo  # noqa: PLC0415

    rows = []
    for w, h in ((1024, 768), (512, 384), (224, 224), (96, 96)):
        img = gradient_photo(w, h, seed).convert("RGB")
        per, reps = _time(lambda: pdq_hash(img), seconds)
        rows.append({"what": "pdq_hash", "image": f"{w}x{h}", "ms_per_image": round(per * 1000, 3), "reps": reps,
                     "resized_to_max_side": MAX_SIDE if max(w, h) > MAX_SIDE else None})
    rng = np.random.default_rng(seed)
    for n in sizes:
        bank = PdqBank(None, "", rng.integers(0, 256, (n, 32), dtype=np.uint8),  # type: ignore[arg-type]
                       tuple(str(i) for i in range(n)), (None,) * n)
        q = bank.hashes[rng.integers(0, n, 32)]
        per, reps = _time(lambda: bank.best(q), seconds)
        rows.append({"what": "pdq_match", "items": n, "batch": 32, "ms_per_batch": round(per * 1000, 3),
                     "us_per_image": round(per * 1e6 / 32, 1), "reps": reps})
    return rows
