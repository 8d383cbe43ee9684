"""The documentation site builds with ``mkdocs build --strict``, offline, and renders the API docstrings."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS_TOOLCHAIN = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material")

# Runs mkdocs' own command line in a subprocess whose sockets cannot connect or resolve names: a build that
# tried to fetch anything (fonts, inventories, plugins' assets) fails instead of silently needing the network.
OFFLINE_BUILD = """
import socket
import sys

def _no_network(*args, **kwargs):
    raise OSError("network access attempted during the documentation build")

socket.socket.connect = _no_network
socket.socket.connect_ex = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network

from mkdocs.__main__ import cli

cli(args=sys.argv[1:], prog_name="mkdocs")
"""


def _missing_toolchain() -> list[str]:
    missing = []
    for name in DOCS_TOOLCHAIN:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # parent package missing
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = _missing_toolchain()
    if missing:
        pytest.skip(f"documentation toolchain not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_BUILD, "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
        + ["--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert "network access attempted" not in result.stderr
    print(f"documentation built in {elapsed:.1f} s")
    return site_dir


def _page(site: Path, name: str) -> str:
    path = site / name / "index.html"
    assert path.is_file(), f"{path} was not built"
    return path.read_text(encoding="utf-8")


def test_api_pages_render_docstrings(site):
    guardspace = _page(site, "api/guardspace")
    assert 'id="peft_safety.GuardSpaceConfig"' in guardspace
    # a field of GuardSpaceConfig with the description from its docstring's Args section
    assert "null_space_threshold" in guardspace
    assert "which eigen-directions of" in guardspace
    assert 'id="peft_safety.export_to_lora"' in guardspace

    somf = _page(site, "api/somf")
    assert 'id="peft_safety.SOMFMerger.fit"' in somf
    assert "Learn the mask logits" in somf
    assert "revert_budget" in somf

    statistics = _page(site, "api/statistics")
    assert 'id="peft_safety.collect_safety_statistics"' in statistics
    assert "exclude_bos" in statistics

    safe_lora = _page(site, "api/safe-lora")
    assert 'id="peft_safety.apply_safe_lora"' in safe_lora
    assert "project every layer whose similarity is below it" in safe_lora

    evaluation = _page(site, "api/evaluation")
    assert "(harmful requests) whose greedy answer the judge flags as harmful" in evaluation


def _public_names(module_file: Path) -> list[str]:
    """``__all__`` of a module, read without importing it (importing peft_safety pulls in torch)."""
    for node in ast.parse(module_file.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{module_file} has no __all__")


def test_api_reference_covers_the_public_surface(site):
    names = ("guardspace", "statistics", "distributed", "somf", "safe-lora")
    pages = "".join(_page(site, f"api/{name}") for name in names)
    for name in _public_names(ROOT / "peft_safety" / "__init__.py"):
        assert f'id="peft_safety.{name}"' in pages, f"peft_safety.{name} is missing from docs/api/"
    evaluation = _page(site, "api/evaluation")
    for name in _public_names(ROOT / "peft_safety" / "evaluation" / "__init__.py"):
        anchors = (f'id="peft_safety.evaluation.{name}"', f'id="peft_safety.evaluation.callback.{name}"')
        assert any(anchor in evaluation for anchor in anchors), f"peft_safety.evaluation.{name} is missing"


def test_site_has_concepts_guides_and_results(site):
    home = _page(site, "")
    for label in ("GuardSpace", "SOMF", "Choosing calibration data", "Benchmarks", "Results", "Examples"):
        assert label in home, label
    calibration = _page(site, "guides/calibration-data")
    assert "rank_allocation" in calibration and "fingerprint" in calibration
    assert 'class="arithmatex"' in calibration  # maths went through pymdownx.arithmatex
    assert (site / "results_quick.png").is_file()


API_PAGES = ("guardspace", "statistics", "distributed", "somf", "safe-lora", "evaluation")


def test_api_pages_have_no_raw_sphinx_roles_or_outside_references(site):
    # Docstrings are Markdown for mkdocstrings: a Sphinx role (:func:`x`) would show up literally on the page.
    raw_role = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|ref):")
    # Nothing outside the repository is cited (sibling checkouts, machine paths, internal reference notes).
    outside = re.compile(r"\.\./shared|/work/|\bREFERENCE\b")
    for name in API_PAGES:
        page = _page(site, f"api/{name}")
        assert not raw_role.search(page), f"api/{name}: raw Sphinx role {raw_role.search(page).group(0)!r}"
        assert not outside.search(page), f"api/{name}: cites {outside.search(page).group(0)!r}"


def test_api_cross_references_and_signatures_are_rendered(site):
    somf = _page(site, "api/somf")
    # a docstring cross-reference became a link to the documented object
    assert 'href="#peft_safety.SafetyMasks.save"' in somf
    # signatures sit in their own formatted block, annotations included
    assert 'class="doc-signature highlight"' in somf
    statistics = _page(site, "api/statistics")
    assert 'href="../evaluation/#peft_safety.evaluation.harmful_score"' in statistics
