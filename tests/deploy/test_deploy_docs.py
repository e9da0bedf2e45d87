"""The README's generated references match the code, and cover all of it."""

from __future__ import annotations

import subprocess
import sys

from deploy_support import ROOT

README = ROOT / "README.md"


def test_readme_generated_references_are_up_to_date():
    from moderator import docs

    text = README.read_text(encoding="utf-8")
    for name in docs.GENERATORS:
        assert f"<!-- BEGIN GENERATED: {name} -->" in text and f"<!-- END GENERATED: {name} -->" in text
    assert docs.render(text) == text, "README's reference tables are stale: run `moderator docs --write`"


def test_every_setting_and_metric_is_documented():
    from prometheus_client.metrics import MetricWrapperBase

    import moderator.metrics as m
    from moderator.config import WorkerSettings

    text = README.read_text(encoding="utf-8")
    for name, field in WorkerSettings.model_fields.items():
        assert f"`MODERATOR_{name.upper()}`" in text, name
        assert field.description, f"WorkerSettings.{name} needs a description (it is the README's text)"
    for obj in vars(m).values():
        if isinstance(obj, MetricWrapperBase):
            assert f"`{obj._name}" in text, obj._name  # noqa: SLF001


def test_docs_cli_check_and_print(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moderator.cli", "docs", "--check", "--readme", str(README)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stale = tmp_path / "README.md"
    stale.write_text("x\n<!-- BEGIN GENERATED: metrics-reference -->\nold\n<!-- END GENERATED: metrics-reference -->\n")
    r = subprocess.run([sys.executable, "-m", "moderator.cli", "docs", "--check", "--readme", str(stale)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "stale" in r.stderr
    r = subprocess.run([sys.executable, "-m", "moderator.cli", "docs", "--write", "--readme", str(stale)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "moderator_decisions_total" in stale.read_text()
    r = subprocess.run([sys.executable, "-m", "moderator.cli", "docs", "config"], capture_output=True, text=True)
    assert "`MODERATOR_KAFKA_BOOTSTRAP_SERVERS`" in r.stdout
