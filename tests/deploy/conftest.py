"""Fixtures for the deploy checks: the real tools (see deploy_support.py), built once and cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy_support import deploy_tool


@pytest.fixture(scope="session")
def helm() -> Path:
    return deploy_tool("helm")


@pytest.fixture(scope="session")
def kubeconform() -> Path:
    return deploy_tool("kubeconform")


@pytest.fixture(scope="session")
def promtool() -> Path:
    return deploy_tool("promtool")


@pytest.fixture(scope="session")
def compose_check() -> Path:
    return deploy_tool("compose-check")


@pytest.fixture(scope="session")
def grafana_dashboard_schema() -> Path:
    return deploy_tool("grafana-dashboard-schema")


@pytest.fixture(scope="session")
def k8s_schemas() -> Path:
    return deploy_tool("k8s-schemas")


@pytest.fixture(scope="session")
def crd_schemas() -> Path:
    return deploy_tool("crd-schemas")
