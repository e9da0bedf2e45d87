"""Labels of the synthetic shapes for the demo policy: what ``moderator calibrate`` reads.

Kept apart from ``synth`` (whose source is part of the demo model's cache key) so editing
the labelling never retrains the demo model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def demo_policy_categories(label: str) -> list[str]:
    """The categories of ``moderator/data/policies/demo.yaml`` a shape of class ``label`` belongs to
    (its stand-ins: red shapes, red stars, yellow shapes): the labels ``moderator calibrate`` reads."""
    colour, shape = label.split(" ", 1)
    if colour == "red":
        return ["red_star"] if shape == "star" else ["red_shapes"]  # red_star rolls up to red_shapes
    if colour == "yellow":
        return ["yellow_shapes"]
    return []


def write_policy_labels(dataset_jsonl: Path, out: Path) -> Path:
    """A ``moderator calibrate`` labels file for a synthetic data set, for the demo policy."""
    dataset_jsonl, out = Path(dataset_jsonl), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in dataset_jsonl.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            cats = demo_policy_categories(r["label"])
            image = (dataset_jsonl.parent / r["path"]).resolve()
            lines.append(json.dumps({"path": os.path.relpath(image, out.parent.resolve()),
                                     "categories": cats or "none", "class": r["label"]}))
    out.write_text("\n".join(lines) + "\n")
    return out
