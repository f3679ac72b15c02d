"""Supported dependency ranges: read from hkd's metadata, checked once, and named when an import breaks."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from hkd import versions
from hkd.errors import HkdError
from tests.conftest import REPO_ROOT

REQUIRES = [
    "torch>=2.6",
    "transformers>=5.21",
    "fakedep>=1.0",
    'triton>=3.2; extra == "triton"',
    'hkd[triton,plot,data]; extra == "test"',
    'pytest>=8; extra == "test"',
]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """hkd's metadata replaced: REQUIRES, the given installed versions, and a tested record."""
    installed = {"hkd": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.25.0", "fakedep": "9.0.0"}
    owners = {"torch": ["torch"], "transformers": ["transformers"], "fakedep": ["fakedep"]}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(versions, "metadata", SimpleNamespace(
        requires=lambda name: list(REQUIRES), version=version, packages_distributions=lambda: owners,
        PackageNotFoundError=importlib.metadata.PackageNotFoundError))
    monkeypatch.setattr(versions, "TESTED_UP_TO", {"transformers": "5.25.0", "fakedep": "2.0"})
    monkeypatch.setattr(versions, "_CHECKED", set())
    monkeypatch.syspath_prepend(str(tmp_path))
    versions.requirements.cache_clear()
    yield SimpleNamespace(installed=installed, root=tmp_path)
    versions.requirements.cache_clear()
    for name in [m for m in sys.modules if m == "fakedep" or m.startswith("fakedep.")]:
        del sys.modules[name]


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / "fakedep" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_ranges_come_from_the_metadata(fake):
    assert versions.requirements()["transformers"] == (">=5.21", None)
    assert versions.requirements()["triton"] == (">=3.2", "triton")
    assert "hkd" not in versions.requirements()  # the test extra's self-reference
    assert "pytest" not in versions.runtime_requirements() and "triton" in versions.runtime_requirements()


@pytest.mark.parametrize("version, spec, ok", [
    ("2.13.0+cpu", ">=2.6", True), ("2.5.1", ">=2.6", False), ("5.21", ">=5.21.0", True),
    ("5.99.0", ">=5.21", True), ("6.0.0", ">=5.21,<6", False), ("1.5.0", "==1.5", True),
    ("1.5.1", "~=1.5.0", True), ("1.6.0", "~=1.5.0", False), ("3.9.1.post1", ">=3.8.4", True),
    ("4.2", "==4.*", True), ("5.0", "!=5.*", False), ("1.0", "", True),
])
def test_version_comparison(version, spec, ok):
    assert versions.satisfies(version, spec) is ok


def test_a_release_below_the_range_is_refused_naming_package_and_range(fake):
    fake.installed["transformers"] = "4.57.6"
    with pytest.raises(HkdError) as raised:
        versions.check("transformers")
    message = str(raised.value)
    assert message.startswith("transformers 4.57.6 is installed; hkd 0.1.0 supports transformers>=5.21")
    assert "last tested with transformers 5.25.0" in message
    assert message.endswith("pip install 'transformers>=5.21,<=5.25.0'")


def test_a_missing_dependency_is_named(fake):
    del fake.installed["torch"]
    with pytest.raises(HkdError, match=r"^torch is not installed; hkd 0.1.0 supports torch>=2.6: pip install 'torch>=2.6'$"):
        versions.check("torch")


def test_newer_releases_pass_and_each_package_is_checked_once(fake, monkeypatch):
    fake.installed["transformers"] = "5.99.0"  # no upper bound: newer than tested is allowed
    versions.check("transformers", "torch", "not-a-dependency")
    fake.installed["transformers"] = "1.0"
    versions.check("transformers")  # already checked in this process: not looked up again


def test_an_import_failing_inside_a_dependency_names_package_version_and_range(fake):
    # transformers 5.25 began importing Hugging Face's `kernels`: a new required package, from deep inside
    write_package(fake.root, {"__init__.py": "from fakedep import core\n", "core.py": "import kernels_xyz_missing\n"})
    with pytest.raises(HkdError) as raised:
        with versions.importing("fakedep"):
            import fakedep  # noqa: F401
    message = str(raised.value)
    assert message.startswith("fakedep 9.0.0 is installed, but importing it failed "
                              "(ModuleNotFoundError: No module named 'kernels_xyz_missing')")
    assert "hkd 0.1.0 supports fakedep>=1.0 and was last tested with fakedep 2.0" in message
    assert message.endswith("pip install 'fakedep>=1.0,<=2.0'")
    assert isinstance(raised.value.__cause__, ModuleNotFoundError)


def test_an_attribute_error_while_a_dependency_imports_is_blamed_on_it(fake):
    write_package(fake.root, {"__init__.py": "import os\nos.removed_in_this_release\n"})
    with pytest.raises(HkdError, match=r"^fakedep 9.0.0 is installed, but importing it failed \(AttributeError: "):
        with versions.importing("torch"):  # the traceback names fakedep, whatever the default
            import fakedep  # noqa: F401


def test_a_name_a_dependency_dropped_is_blamed_on_it(fake):
    write_package(fake.root, {"__init__.py": "present = 1\n"})
    with pytest.raises(HkdError, match=r"^fakedep 9.0.0 is installed, but importing it failed \(ImportError: cannot import name 'gone'"):
        with versions.importing("torch"):
            from fakedep import gone  # noqa: F401


def test_the_cli_names_the_package_and_range(fake, monkeypatch, capsys):
    from hkd import cli

    write_package(fake.root, {"__init__.py": "import kernels_xyz_missing\n"})

    def cmd_stages(args, extra):
        import fakedep  # noqa: F401

        return 0

    monkeypatch.setattr(cli, "cmd_stages", cmd_stages)
    monkeypatch.delenv("HKD_DEBUG", raising=False)
    assert cli.main(["stages"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hkd: error: fakedep 9.0.0 is installed, but importing it failed (ModuleNotFoundError")
    assert err.endswith("pip install 'fakedep>=1.0,<=2.0'") and "\n" not in err


def test_errors_that_are_not_a_dependency_import_pass_through(fake, monkeypatch):
    from hkd import cli

    def cmd_stages(args, extra):
        raise AttributeError("a bug in hkd, at run time")

    monkeypatch.setattr(cli, "cmd_stages", cmd_stages)
    with pytest.raises(AttributeError, match="a bug in hkd"):
        cli.main(["stages"])
    try:
        import hkd.no_such_module  # noqa: F401
    except ImportError as exc:
        assert versions.explain(exc) is None  # hkd's own modules are not a dependency


def pyproject_bounds() -> dict[str, str]:
    """Runtime dependency -> its specifier, from pyproject.toml itself (the installed metadata can be stale)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in versions.RUNTIME_EXTRAS for r in project["optional-dependencies"][extra]]
    bounds = {}
    for line in lines:
        match = versions._REQUIREMENT.match(line)
        assert match is not None, line
        bounds[versions.canonical(match.group(1))] = match.group(2).strip()
    return bounds


def test_the_minimum_constraints_pin_every_runtime_dependency_at_its_lower_bound():
    pins = {}
    for line in (REPO_ROOT / ".ci" / "minimum-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[versions.canonical(name)] = version.strip()
    bounds = pyproject_bounds()
    assert set(pins) == set(bounds)
    for name, spec in bounds.items():
        floor = next(c.strip()[2:] for c in spec.split(",") if c.strip().startswith(">="))
        if name == "torch":  # CI can install only the CPU build of 2.13.0
            assert versions.satisfies(pins[name], spec), (name, pins[name], spec)
        else:
            assert versions.release(pins[name]) == versions.release(floor), (name, pins[name], spec)


def test_the_tested_record_covers_every_runtime_dependency_within_its_range():
    bounds = pyproject_bounds()
    assert set(versions.TESTED_UP_TO) == set(bounds)
    for name, tested in versions.TESTED_UP_TO.items():
        assert versions.satisfies(tested, bounds[name]), (name, tested, bounds[name])


def test_this_environment_is_within_the_declared_ranges(capsys):
    versions.check("torch", "transformers")
    assert versions.main() == 0
    assert "transformers" in capsys.readouterr().out
