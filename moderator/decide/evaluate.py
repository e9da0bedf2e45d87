"""Policy evaluation on labelled images: a confusion matrix of expected vs actual action.

Used to calibrate thresholds (``moderator evaluate-policy``) and by the tests of
the demo policy. Labelled data is JSONL with ``path`` and ``label`` per line.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from moderator.schemas import ACTION_SEVERITY


def read_labelled(jsonl: Path) -> list[tuple[Path, str]]:
    jsonl = Path(jsonl)
    rows = []
    for line in jsonl.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows.append((jsonl.parent / r["path"], r["label"]))
    return rows


def confusion(classifier, rows: list[tuple[Path, str]], progress=None) -> dict[str, Counter]:
    """label -> Counter(action) over ``read_labelled`` rows. Audit-sampled escalations are
    counted as ``audit``; ``progress(1)`` after each image."""
    label_of = {p: label for p, label in rows}
    out: dict[str, Counter] = defaultdict(Counter)
    for r in classifier.classify_files([p for p, _ in rows]):
        if progress is not None:
            progress(1)
        label = label_of[r.path]
        if r.error is not None:
            out[label]["error"] += 1
            continue
        d = r.decision
        action = "audit" if any(x.startswith("audit_sample:") for x in d.reasons) else d.action
        out[label][action] += 1
    return dict(out)


def format_confusion(matrix: dict[str, Counter]) -> str:
    cols = sorted({a for c in matrix.values() for a in c}, key=lambda a: (ACTION_SEVERITY.get(a, 3), a))
    width = max(len(k) for k in matrix) + 2
    lines = [f"{'label':<{width}}" + "".join(f"{c:>10}" for c in cols)]
    for label in sorted(matrix):
        lines.append(f"{label:<{width}}" + "".join(f"{matrix[label].get(c, 0):>10}" for c in cols))
    return "\n".join(lines)
