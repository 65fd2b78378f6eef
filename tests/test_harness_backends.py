"""Adapter lookup: the static table of built-ins, entry points, run-time names and import paths.

Listing names imports no adapter (a missing optional package costs nothing until its adapter is
asked for), each built-in loads under its own name, an installed package's entry point is a name
like any other, and every way a lookup can fail names the adapter and what is missing.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from harness import adapters
from harness.backends import BUILTIN, ENTRY_POINT_GROUP

REPO = Path(__file__).resolve().parents[1]


def test_every_builtin_loads_under_its_own_name():
    assert set(BUILTIN) <= set(adapters.available())
    for name in BUILTIN:
        a = adapters.load(name)
        assert a.name == name, (name, a.name)
        assert isinstance(a.conventions, adapters.Conventions) and a.devices


def test_listing_adapters_imports_none_of_them():
    code = (
        "import sys\n"
        "from harness import adapters\n"
        "names = adapters.available()\n"
        "assert 'dsv4-torch' in names and 'reference' in names, names\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('dsv4', 'harness.backends.')))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_named_adapter_whose_module_is_missing_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(BUILTIN, "ghost", "no_such_pkg_xyz.mod:Thing")
    with pytest.raises(adapters.AdapterError, match=r"adapter 'ghost' \(no_such_pkg_xyz\.mod"):
        adapters.load("ghost")
    # the module exists but needs a package that is not installed (dsv4 without triton, say)
    (tmp_path / "needs_missing.py").write_text("import no_such_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BUILTIN, "needy", "needs_missing:Thing")
    with pytest.raises(adapters.AdapterError) as e:
        adapters.load("needy")
    assert str(e.value) == (
        "adapter 'needy' (needs_missing:Thing) does not load: no module named 'no_such_dep_xyz'"
    )
    monkeypatch.setitem(BUILTIN, "typo", "harness.backends.reference:Nope")
    with pytest.raises(adapters.AdapterError, match="has no attribute 'Nope'"):
        adapters.load("typo")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(adapters.AdapterError) as e:
        adapters.load("nope")
    assert "unknown adapter 'nope'" in str(e.value)
    assert all(n in str(e.value) for n in BUILTIN) and "module:attr" in str(e.value)


def test_an_installed_package_adds_adapters_by_entry_point(monkeypatch):
    monkeypatch.chdir(REPO)  # tests.planted from the cwd, like the CLI
    mine = metadata.EntryPoint("my-kernel", "tests.planted:RoundHalfAway", ENTRY_POINT_GROUP)
    shadow = metadata.EntryPoint("reference", "tests.planted:Raises", ENTRY_POINT_GROUP)
    seen = []

    def entry_points(group: str):
        seen.append(group)
        return [mine, shadow] if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(adapters.metadata, "entry_points", entry_points)
    assert "my-kernel" in adapters.available() and seen == [ENTRY_POINT_GROUP]
    assert type(adapters.load("my-kernel")).__name__ == "RoundHalfAway"
    # a built-in name is not taken over by a package
    assert type(adapters.load("reference")).__name__ == "ReferenceAdapter"


def test_a_name_registered_at_run_time_wins(monkeypatch):
    from tests.planted import Raises

    monkeypatch.setattr(adapters, "_REGISTRY", {})
    adapters.register("reference", Raises)
    assert isinstance(adapters.load("reference"), Raises)


def test_an_import_path_that_does_not_resolve_is_named_as_given():
    with pytest.raises(adapters.AdapterError) as e:
        adapters.load("no_such_mod_xyz:X")
    assert str(e.value) == "adapter 'no_such_mod_xyz:X': no module named 'no_such_mod_xyz'"
    with pytest.raises(adapters.AdapterError) as e:
        adapters.load("harness.cases:Nope")
    assert str(e.value) == (
        "adapter 'harness.cases:Nope': module harness.cases has no attribute 'Nope'"
    )
