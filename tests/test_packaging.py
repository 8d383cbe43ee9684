"""Packaging: one version number, type hints shipped (PEP 561), and a cheap ``import peft_safety``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import peft_safety

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)


def test_version_comes_from_pyproject():
    assert peft_safety.__version__ == _pyproject()["project"]["version"]


def test_version_number_is_written_once():
    version = _pyproject()["project"]["version"]
    package = os.path.join(ROOT, "peft_safety")
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    assert f'"{version}"' not in handle.read(), os.path.join(folder, name)


def test_py_typed_is_shipped():
    assert os.path.isfile(os.path.join(ROOT, "peft_safety", "py.typed"))
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["peft_safety"]


def test_import_is_cheap_and_public_names_load_on_access():
    code = (
        "import sys, peft_safety\n"
        "heavy = [name for name in ('torch', 'transformers', 'peft') if name in sys.modules]\n"
        "names = [getattr(peft_safety, name).__name__ for name in peft_safety.__all__]\n"
        "print(heavy, names == peft_safety.__all__, peft_safety.somf.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[] True peft_safety.somf", done.stdout
