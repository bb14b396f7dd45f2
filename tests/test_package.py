"""Packaging: the folders install as `mimo_voice.*` subpackages with their data files."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SUBPACKAGES = ["agent", "configs", "streaming", "tools", "transports"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_imports_under_the_mimo_voice_namespace(name):
    module = importlib.import_module(f"mimo_voice.{name}")
    assert Path(module.__file__).parent.name == name


def test_bare_folder_names_are_not_importable_from_elsewhere(tmp_path):
    # From outside the checkout, only the namespaced names exist.
    code = (
        "import importlib.util as u; "
        "print(u.find_spec('streaming') is None, u.find_spec('mimo_voice.streaming') is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_packaged_yaml_is_installed():
    from mimo_voice.configs import CONFIG_DIR

    assert {"default.yaml", "support.yaml", "phone.yaml"} <= {p.name for p in CONFIG_DIR.glob("*.yaml")}


def test_every_test_is_in_one_tier(request):
    """conftest.py marks each test unit, engine or e2e (``scripts/dev test -m unit`` selects the fast tier)."""
    tiers = {name for name in ("unit", "engine", "e2e") if request.node.get_closest_marker(name)}
    assert tiers == {"unit"}
