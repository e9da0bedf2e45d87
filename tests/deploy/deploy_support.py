"""Helpers for the deploy checks: the real tools, built once and cached.

``deploy/tools/install-tools.sh`` builds helm, kubeconform and promtool with ``go install``,
compose-check from ``deploy/tools/composecheck``, derives Grafana's dashboard JSON schema from
npm's ``@grafana/schema``, writes kubeconform-layout Kubernetes schemas from the
``kubernetes-validate`` wheel and the prometheus-operator and KEDA CRDs' schemas from their Go modules. The first run on a fresh machine takes minutes (promtool and
helm dominate); later runs find everything in ``$MODERATOR_CACHE_DIR/bin``. A tool that cannot
be had fails the tests that need it -- never a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "moderator"
INSTALL_TOOLS = ROOT / "deploy" / "tools" / "install-tools.sh"

_cache: dict[str, Path] = {}


def deploy_tool(name: str) -> Path:
    """Path of a tool from install-tools.sh, building it on first use."""
    if name not in _cache:
        env = dict(os.environ, PYTHON=sys.executable)
        r = subprocess.run(["bash", str(INSTALL_TOOLS), name], capture_output=True, text=True,
                           env=env, timeout=3600)
        if r.returncode != 0:
            pytest.fail(f"install-tools.sh {name} failed (rc={r.returncode}):\n{r.stderr[-6000:]}", pytrace=False)
        for line in r.stdout.splitlines():
            key, _, value = line.partition("=")
            if key == name:
                _cache[name] = Path(value)
                break
        else:
            pytest.fail(f"install-tools.sh {name} printed no path:\n{r.stdout}\n{r.stderr[-2000:]}", pytrace=False)
    return _cache[name]


def run(cmd: list, *, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} -> rc={r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}",
                    pytrace=False)
    return r
