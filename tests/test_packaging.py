"""The package as users install it: a wheel built from this checkout, its metadata and package
data, and (slow) that wheel in a fresh venv, where `moderator demo --help`, `moderator --version`,
`python -m moderator` and the file lookups of the demo and the Kafka harness work without a
checkout beside them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml

from moderator import __version__
from moderator.cli import main, version_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("moderator-*.whl")
    return whl


def _metadata(whl: Path):
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def test_wheel_carries_its_data_and_metadata(wheel):
    assert wheel.name.startswith(f"moderator-{__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for needed in ("moderator/__main__.py", "moderator/data/policies/demo.yaml", "moderator/data/kafka/pom.xml",
                       "moderator/data/kafka/log4j2.properties", "moderator/model/configs/moderator-tiny.json"):
            assert needed in names, needed
        assert yaml.safe_load(z.read("moderator/data/policies/demo.yaml"))["categories"]
        assert b"kafka_2.13" in z.read("moderator/data/kafka/pom.xml")
    meta = _metadata(wheel)
    assert meta["Version"] == __version__
    requires = meta.get_all("Requires-Dist")
    base = [r for r in requires if "extra ==" not in r]
    # ONNX Runtime only through an extra: the cpu and gpu builds ship the same module and must not meet
    assert not any(r.startswith("onnxruntime") for r in base), base
    assert any(r.startswith("crc32c") for r in base), "kafka-python's C CRC-32C belongs to the base install"
    extra = lambda name: [r.split(";")[0].strip() for r in requires if f'extra == "{name}"' in r]  # noqa: E731
    assert [r for r in extra("cpu") if r.startswith("onnxruntime")] == ["onnxruntime<2,>=1.20"]
    assert [r for r in extra("gpu") if r.startswith("onnxruntime")] == ["onnxruntime-gpu<2,>=1.20"]
    assert any(r.startswith("torch") for r in extra("train")) and not any("torch" in r for r in base)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    chart = yaml.safe_load((ROOT / "helm" / "moderator" / "Chart.yaml").read_text())
    assert urls["Homepage"] == chart["home"] and {"Source", "Issues", "Documentation"} <= urls.keys()
    # the gpu extra's onnxruntime-gpu is pinned to the cpu build's version
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["onnxruntime-gpu"] == pins["onnxruntime"]


def test_version_flag_names_the_onnxruntime_build(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == version_line() and out.startswith(f"moderator {__version__} (onnxruntime ")


@pytest.mark.slow
def test_the_wheel_works_in_a_fresh_venv(wheel, tmp_path):
    """A fresh venv, the wheel with its cpu extra (pinned), then the commands from elsewhere than
    the checkout; and what pip would install for the gpu extra (a dry run: no 250 MB download)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, exe = venv / "bin" / "python", venv / "bin" / "moderator"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, f"{wheel}[cpu]"], check=True, capture_output=True, text=True, timeout=900)

    def run(*args: str) -> str:
        r = subprocess.run(list(args), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
        return r.stdout

    assert run(str(exe), "--version").startswith(f"moderator {__version__} (onnxruntime ")
    assert run(str(py), "-m", "moderator", "--version") == run(str(exe), "--version")
    assert "--hold" in run(str(exe), "demo", "--help")
    assert "--compare-policy" in run(str(exe), "bench-worker", "--help")
    lookups = json.loads(run(str(py), "-c", """if True:
        import json, pathlib
        import moderator
        from moderator.resources import DEMO_POLICY
        from moderator.demo import DEMO_POLICY as demo_default
        from moderator.devservices.kafka import deploy_dir, _log4j_config
        from moderator.decide.policy import load_policy
        print(json.dumps({"package": str(pathlib.Path(moderator.__file__).parent), "policy": str(DEMO_POLICY),
                          "demo_default": str(demo_default), "categories": len(load_policy(DEMO_POLICY).doc.categories),
                          "pom": str(deploy_dir() / "pom.xml"), "pom_exists": (deploy_dir() / "pom.xml").is_file(),
                          "log4j": str(_log4j_config())}))
        """).strip().splitlines()[-1])
    package = lookups["package"]
    assert "site-packages" in package and not package.startswith(str(ROOT)), package
    assert lookups["policy"].startswith(package) and lookups["demo_default"] == lookups["policy"]
    assert lookups["categories"] >= 2
    assert lookups["pom_exists"] and lookups["pom"].startswith(package) and lookups["log4j"].startswith(package)
    # no torch in the base + cpu install: with nothing cached, training says which extra it needs
    env = {**os.environ, "MODERATOR_CACHE_DIR": str(tmp_path / "empty-cache")}
    r = subprocess.run([str(exe), "demo-model"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "moderator[train]" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]

    report = tmp_path / "gpu.json"
    subprocess.run([*pip, "--dry-run", "--ignore-installed", "--report", str(report), f"{wheel}[gpu]"],
                   check=True, capture_output=True, text=True, timeout=600)
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names and "torch" not in names
