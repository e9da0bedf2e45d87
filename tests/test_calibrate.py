"""``moderator calibrate``: the threshold arithmetic, bad labels files, and the demo domain end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from moderator.calibrate import (escalate_threshold, flag_threshold, pr_curve, read_labels, wilson_lower)
from moderator.cli import main
from moderator.decide.policy import load_policy
from moderator.errors import LabelsError
from moderator.resources import DEMO_POLICY

DEMO_POLICY = DEMO_POLICY


def test_pr_curve_and_threshold_choice():
    s = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    y = np.array([1, 1, 0, 1, 0, 1, 0, 0], dtype=bool)
    c = pr_curve(s, y)
    assert c["threshold"].tolist() == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]  # ties are one point
    assert c["precision"][:3].tolist() == [1.0, 2 / 3, 0.75]
    assert c["recall"].tolist() == [0.25, 0.5, 0.75, 0.75, 1.0, 1.0, 1.0]
    assert flag_threshold(c, 0.7) == 0.7  # lowest threshold with precision >= 0.7: most recall
    assert flag_threshold(c, 0.5) == 0.3 or flag_threshold(c, 0.5) == 0.5
    assert flag_threshold(c, 1.0) == 0.9
    assert escalate_threshold(c, 0.75) == 0.7  # highest threshold with recall >= 0.75: least review
    assert escalate_threshold(c, 1.0) == 0.5
    # with a confidence, 3 of 3 is not proof of precision 0.95, 300 of 300 is
    assert flag_threshold(c, 0.95, confidence=0.9) is None
    assert wilson_lower(np.array([300]), np.array([300]), 0.9)[0] > 0.99
    assert wilson_lower(np.array([3]), np.array([3]), 0.9)[0] < 0.7
    assert wilson_lower(np.array([3]), np.array([4]), 0.0)[0] == 0.75


def _labels(tmp_path, lines):
    img = tmp_path / "a.png"
    if not img.exists():
        from PIL import Image
        Image.new("RGB", (8, 8)).save(img)
    p = tmp_path / "labels.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("lines, message", [
    (['{"path": "a.png", "categories": ["red_star"]}', '{"path": "a.png", "categories": ["weapons"]}'],
     r"labels.jsonl:2: unknown category \['weapons'\]"),
    (['{"path": "a.png", "categories": "none"}', '{"path": "gone.png", "categories": []}'],
     r"labels.jsonl:2: image gone.png not found"),
    (['{"path": "a.png", "categories": "none"}', '{"path": "a.png", "categories": "none"}'],
     r"labels.jsonl:2: image a.png is already labelled on line 1"),
    (['{"path": "a.png", "categories": "red_star"}'], r"labels.jsonl:1: \"categories\" must be a list"),
    (['{"path": "a.png", "categories": []}', "{oops"], r"labels.jsonl: line 2: not JSON"),
    ([""], r"labels.jsonl: no labelled images"),
])
def test_bad_labels_name_the_file_and_line(tmp_path, lines, message):
    doc = load_policy(DEMO_POLICY).doc
    with pytest.raises(LabelsError, match=message):
        read_labels(_labels(tmp_path, lines), doc)


def test_labels_count_for_ancestors(tmp_path):
    doc = load_policy(DEMO_POLICY).doc
    (item,) = read_labels(_labels(tmp_path, ['{"path": "a.png", "categories": ["red_star"]}']), doc)
    assert item.categories == {"red_star", "red_shapes"}


def test_cli_bad_labels_is_one_line_exit_2(tmp_path, capsys, random_model_dir):
    labels = _labels(tmp_path, ['{"path": "a.png", "categories": ["nope"]}'])
    rc = main(["calibrate", "--labels", str(labels), "--policy", str(DEMO_POLICY), "--model-dir",
               str(random_model_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "[labels_invalid]" in err and "labels.jsonl:1: unknown category" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_calibrated_thresholds_meet_the_precision_on_the_held_out_split(demo_model, tmp_path, capsys):
    from PIL import Image

    from moderator.model.demo_labels import write_policy_labels
    from moderator.model.synth import write_dataset

    data = write_dataset(tmp_path / "data", 4000, seed=11, split="heldout")
    # the same paths as `moderator synth --heldout 4000 --seed 11 --policy-labels`, so the same split
    labels = write_policy_labels(data, tmp_path / "data" / "heldout.policy-labels.jsonl")
    out = tmp_path / "cal"
    rc = main(["calibrate", "--labels", str(labels), "--policy", str(DEMO_POLICY), "--model-dir",
               str(demo_model.model_dir), "--out", str(out), "--flag-precision", "0.95", "--escalate-recall", "0.9",
               "--version", "demo-1+cal-test", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration_images"] + report["heldout_images"] == 4000
    assert 1800 < report["heldout_images"] < 2200
    cats = report["categories"]
    # red_star is the demo policy's one flagging category: its new flag meets the precision held out
    star = cats["red_star"]
    assert "flag_unmet" not in star
    held = star["heldout"]["flag"]
    print(f"\nred_star: flag {star['new']['flag']} -> held-out precision {held['precision']} "
          f"recall {held['recall']} ({held['tp']} tp, {held['fp']} fp)")
    assert held["precision"] >= 0.95 and held["tp"] >= 50
    assert star["new"]["escalate"] <= star["new"]["flag"]
    # review-only categories stay review-only; their escalate recall is reported held out
    for cid in ("red_shapes", "yellow_shapes"):
        assert cats[cid]["new"]["flag"] is None
        print(f"{cid}: escalate {cats[cid]['new']['escalate']} -> held-out recall "
              f"{cats[cid]['heldout']['escalate']['recall']}")
        assert cats[cid]["heldout"]["escalate"]["recall"] >= 0.85
    # the new policy: new thresholds and version, every other field as it was
    old, new = load_policy(DEMO_POLICY).doc, load_policy(out / "policy.yaml").doc
    assert new.version == "demo-1+cal-test"
    strip = lambda d: {**d.model_dump(exclude={"version"}), "categories": [  # noqa: E731
        {k: v for k, v in c.items() if k != "thresholds"} for c in d.model_dump()["categories"]]}
    assert strip(old) == strip(new)
    by_id = {c.id: c for c in new.categories}
    assert by_id["red_star"].thresholds.flag == star["new"]["flag"]
    assert by_id["purple_square"].thresholds == {c.id: c for c in old.categories}["purple_square"].thresholds
    # a PNG per enabled category, and the JSON report on disk
    for cid in ("red_shapes", "red_star", "yellow_shapes"):
        with Image.open(out / f"{cid}.png") as im:
            assert im.format == "PNG" and im.size[0] > 500
    assert json.loads((out / "report.json").read_text())["new_version"] == "demo-1+cal-test"
    assert yaml.safe_load((out / "policy.yaml").read_text())["version"] == "demo-1+cal-test"


@pytest.mark.parametrize("args, message", [
    (["--confidence", "0.3"], "--confidence must be 0"),
    (["--flag-precision", "1.0"], "a target of 1.0 can never be proven"),
    (["--holdout", "1.0"], "--holdout must be between 0 and 1"),
])
def test_cli_refuses_settings_that_cannot_work(tmp_path, capsys, random_model_dir, args, message):
    labels = _labels(tmp_path, ['{"path": "a.png", "categories": ["red_star"]}'])
    rc = main(["calibrate", "--labels", str(labels), "--policy", str(DEMO_POLICY), "--model-dir",
               str(random_model_dir), "--out", str(tmp_path / "out"), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_new_policy_keeps_its_banks_reachable_from_the_output_folder(tmp_path):
    from moderator.calibrate import _rewrite_policy

    src = tmp_path / "policies"
    src.mkdir()
    text = DEMO_POLICY.read_text() + (
        "banks:\n  - {name: kb, path: banks/kb.npz, kind: known_bad}\n"
        "pdq_banks:\n  - {name: tx, path: /abs/tx.csv}\n")
    (src / "p.yaml").write_text(text)
    out = tmp_path / "elsewhere" / "cal"
    out.mkdir(parents=True)
    report = {"labels": "l", "calibration_images": 1, "heldout_images": 1, "flag_precision": 0.95,
              "escalate_recall": 0.9, "out_dir": str(out)}
    new = yaml.safe_load(_rewrite_policy(load_policy(src / "p.yaml"), {}, "v2", report))
    assert (out / new["banks"][0]["path"]).resolve() == (src / "banks" / "kb.npz").resolve()
    assert new["pdq_banks"][0]["path"] == "/abs/tx.csv"
