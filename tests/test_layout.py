"""The checkout never shadows a dependency, from wherever Python or pytest starts in it.

Python puts the working directory (``python -c``, ``-m``, ``torchrun -m``, a notebook) or the
script's folder (``python bench/x.py``) first on ``sys.path``, and pytest puts the root of each
test package there. A folder or file there named like a module that an installed distribution
provides wins over the installed one: transformers 5.25 imports Hugging Face's ``kernels`` when it
loads any model, and a top-level ``kernels/`` broke every model load started from the root.
"""

from __future__ import annotations

import importlib.metadata
import keyword
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# the folders that become sys.path[0]: the root (python -c / -m, torchrun, notebooks, pytest's rootdir
# for the tests package) and the folders whose scripts users run as `python DIR/script.py`
ENTRY_FOLDERS = ["", "bench", "tools", "docs", "examples", "examples/plugin-template/tests"]
OWN = {"hkd", "hkd_example_plugin", "tests"}  # ours: installed from this checkout


def importable_names(folder: Path) -> set[str]:
    """Names ``import NAME`` finds in ``folder``: modules, packages and namespace folders."""
    names = set()
    for entry in folder.iterdir():
        name = entry.stem if entry.suffix == ".py" else entry.name
        if (entry.is_dir() or entry.suffix == ".py") and name.isidentifier() and not keyword.iskeyword(name):
            names.add(name)
    return names


def taken_names() -> dict[str, str]:
    """Every top-level module name an installed distribution or the standard library provides."""
    taken = {name: ", ".join(dists) for name, dists in importlib.metadata.packages_distributions().items()}
    taken.update({name: "the standard library" for name in sys.stdlib_module_names})
    return taken


@pytest.mark.parametrize("folder", ENTRY_FOLDERS)
def test_no_folder_python_starts_in_shadows_an_installed_module(folder):
    # catches: a top-level kernels/ (Hugging Face's kernels), tests/kernels/ as a rootdir package,
    # bench/kernels.py run as `python bench/kernels.py`, or any new file named like a dependency
    taken = taken_names()
    clashes = {name: taken[name] for name in importable_names(REPO_ROOT / folder) - OWN if name in taken}
    assert clashes == {}, f"{folder or '.'}: these names shadow installed modules: {clashes}"


def test_the_check_sees_a_shadowing_folder(tmp_path):
    # catches: a check that passes on the broken layout (the one this file guards against)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "json.py").write_text("")
    assert {"kernels", "json"} <= importable_names(tmp_path) & set(taken_names())


def run_from_root(code: str, subprocess_env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_model_loads_in_python_started_at_the_root(model_dirs, subprocess_env):
    # catches: the README's from_pretrained failing in any python (or notebook) opened in the checkout
    code = ("import kernels, transformers\n"
            f"model = transformers.AutoModelForCausalLM.from_pretrained({str(model_dirs['student'])!r})\n"
            "print(kernels.__file__, type(model).__name__)")
    proc = run_from_root(code, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_file, model_class = proc.stdout.split()
    assert Path(kernels_file).resolve().is_relative_to(Path(importlib.metadata.distribution("kernels")
                                                            .locate_file("")).resolve())
    assert model_class == "LlamaForCausalLM"


@pytest.mark.slow
def test_pytest_collects_from_the_root(subprocess_env):
    # catches: `python -m pytest` stopping at collection (tests/kernels/ imported as `kernels`)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " collected" in proc.stdout or "tests collected" in proc.stdout


def lint_imports(root: Path, subprocess_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(subprocess_env, PYTHONPATH=str(root))  # the tree under test, not the installed one
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(root / "pyproject.toml"),
                           "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept(subprocess_env):
    # catches: an import against the layers (a lower layer reaching up, a plugin importing internals)
    proc = lint_imports(REPO_ROOT, subprocess_env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("hkd/models/taps.py", "import hkd.train.loop", "Layers"),
    ("hkd/train/loop.py", "import hkd.plugins.logits", "The core never imports a built-in plugin"),
    ("hkd/plugins/sft.py", "from hkd.models.loading import load_model", "Built-in plugins import only"),
])
def test_the_contracts_catch_a_planted_import(module, line, contract, tmp_path, subprocess_env):
    # catches: contracts that name no real module (import-linter then checks nothing)
    import shutil

    shutil.copytree(REPO_ROOT / "hkd", tmp_path / "hkd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # planted\n")
    proc = lint_imports(tmp_path, subprocess_env)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout and "2 kept, 1 broken" in proc.stdout


def test_no_import_cycles():
    # catches: two modules importing each other, however hidden inside functions
    import grimp

    graph = grimp.build_graph("hkd", exclude_type_checking_imports=True)
    cycles = sorted({tuple(sorted((importer, imported))) for importer in graph.modules
                     for imported in graph.find_modules_directly_imported_by(importer)
                     if imported != importer and graph.find_shortest_chain(importer=imported, imported=importer)})
    assert cycles == []
