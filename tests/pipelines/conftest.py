"""Pipelines are scripts, not package modules: tests load them by path."""

import importlib.util
import sys
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def _load(name: str):
    """The module of ``pipelines/<name>.py``, registered under ``name`` (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, PIPELINES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_pipeline():
    return _load
