"""Policy files: validation with errors that name file, field and problem."""

from pathlib import Path

import pytest

from moderator.decide.policy import load_policy, parse_policy
from moderator.errors import PolicyError

POLICIES = Path(__file__).resolve().parents[1] / "moderator" / "data" / "policies"

GOOD = """
version: "t1"
categories:
  - id: weapons
    label: Weapons
    prompts: ["a gun"]
    thresholds: {flag: 0.3, escalate: 0.2}
"""


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml"])
def test_shipped_policies_are_valid(name):
    p = load_policy(POLICIES / name)
    assert p.doc.version and len(p.sha256) == 64
    assert all(c.thresholds.flag is None or c.thresholds.escalate <= c.thresholds.flag for c in p.doc.categories)


def test_default_policy_covers_the_starter_categories():
    ids = {c.id for c in load_policy(POLICIES / "default.yaml").doc.categories}
    assert {"graphic_violence", "sexual", "hate_symbols", "weapons", "drugs", "self_harm"} <= ids
    for c in load_policy(POLICIES / "default.yaml").doc.categories:
        assert len(c.prompts) >= 3, c.id


@pytest.mark.parametrize("body, field, problem", [
    (GOOD.replace("escalate: 0.2", "escalate: 0.5"), "categories[0](id=weapons).thresholds", "must be <= flag"),
    (GOOD.replace('version: "t1"', ""), "version", "Field required"),
    (GOOD.replace("id: weapons", "id: Weapons!"), "categories[0](id=Weapons!).id", "pattern"),
    (GOOD.replace('prompts: ["a gun"]', "prompts: []"), "categories[0](id=weapons).prompts", "at least 1"),
    (GOOD + "    parent: nope\n", "categories", "parent 'nope' is not a category"),
    (GOOD + "templates: ['no slot']\n", "templates", "exactly one"),
    (GOOD + "    surprise: 1\n", "categories[0](id=weapons).surprise", "Extra inputs"),
    (GOOD.replace("flag: 0.3", "flag: high"), "categories[0](id=weapons).thresholds.flag", "valid number"),
    (GOOD + GOOD.split("categories:\n")[1], "categories", "duplicate category ids"),
    (GOOD + "    audit_sample_rate: 2\n", "categories[0](id=weapons).audit_sample_rate", "less than or equal"),
])
def test_errors_name_file_field_and_problem(tmp_path, body, field, problem):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    msg = str(e.value)
    assert str(f) in msg
    assert field in msg, msg
    assert problem in msg, msg


def test_yaml_syntax_and_shape_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("version: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(f)
    f.write_text("- a list\n")
    with pytest.raises(PolicyError, match="mapping"):
        load_policy(f)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_review_only_category_and_parent_cycle():
    doc = parse_policy(GOOD.replace("flag: 0.3", "flag: null").encode()).doc
    assert doc.categories[0].thresholds.flag is None
    cyc = GOOD + """  - id: a
    label: A
    parent: b
    prompts: ["x"]
    thresholds: {flag: 0.3, escalate: 0.2}
  - id: b
    label: B
    parent: a
    prompts: ["y"]
    thresholds: {flag: 0.3, escalate: 0.2}
"""
    with pytest.raises(PolicyError, match="loops"):
        parse_policy(cyc.encode())
