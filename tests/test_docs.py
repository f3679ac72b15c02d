"""The documentation site: generated pages are current, every code block a reader copies works.

docs/plugins.md's hook reference matches hkd/plugin/hookspecs.py and its plugin examples run;
docs/reference/config.md matches the config dataclasses; docs/benchmarks.md matches
bench/results/; every bash, python, yaml and toml block of README.md and docs/ is run or
validated (tests/doc_blocks.py); ``mkdocs build --strict`` itself runs in CI (.ci/run).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from hkd.plugin import hookspecs
from hkd.kernels import distill_loss, registry
from hkd.plugin.manager import build_manager
from hkd.sampling.verify import build_verifier
from tests import doc_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"


def load_generator(name: str = "gen_hooks") -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example(marker: str) -> types.ModuleType:
    """Run the page's Python block that contains ``marker`` as a module (a plugin object)."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "plugins.md").read_text(), re.S)
    [code] = [b for b in blocks if f"@hookimpl\ndef {marker}(" in b]
    module = types.ModuleType(f"docs_example_{marker}")
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class is made
    try:
        exec(compile(code, f"docs/plugins.md ({marker})", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


def test_plugins_md_hook_reference_is_up_to_date(capsys):
    generator = load_generator()
    assert generator.main(["--check"]) == 0, capsys.readouterr().err
    documented = re.findall(r"^### `(\w+)`", generator.reference(), re.M)
    assert documented == [n for n in vars(hookspecs) if n.startswith("hkd_")]  # every hook, in source order


def test_a_changed_docstring_makes_the_check_fail(monkeypatch, capsys):
    generator = load_generator()
    monkeypatch.setattr(hookspecs.hkd_after_step, "__doc__", "Changed.")
    assert generator.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_the_verifier_example_runs():
    # the template package (installed in CI) ships the same verifier: keep it out of this test
    installed = {ep.name for ep in __import__("importlib.metadata").metadata.entry_points(group="hkd")}
    pm = build_manager(disable=installed & {"example"}, extra_plugins=[("docs_verifier", example("hkd_add_verifiers"))])
    verify = build_verifier(pm, "length_limit", {"max_chars": 5})
    assert verify({}, "=> 42").passed and verify({}, "=> 123456").reason == "too_long"


def test_the_stage_example_builds():
    module = example("hkd_add_stages")
    [spec] = module.hkd_add_stages()
    assert spec.name == "final_cosine" and spec.config_cls().eps == 1e-8


@pytest.fixture
def float64_backend():
    pm = build_manager(extra_plugins=[("docs_kernel", example("hkd_add_kernel_backends"))])
    yield pm
    build_manager()  # the default plugins' kernel backends again: float64 is gone


def test_the_kernel_backend_example_registers_and_matches_the_reference(float64_backend):
    student = torch.randn(7, 37, requires_grad=True)
    teacher = torch.randn(7, 37)
    labels = torch.tensor([1, 2, -100, 4, 5, 6, -100])
    options = {"labels": labels, "temperature": 2.0, "alpha": 0.3}
    ours = distill_loss(student, teacher, backend="float64", **options)
    (grad,) = torch.autograd.grad(ours, student)
    reference = distill_loss(student, teacher, backend="torch", **options)
    (reference_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad, reference_grad)
    rows = {b["name"]: b for b in registry.backends("distill_loss")}
    assert rows["float64"]["available"] and not rows["float64"]["auto"]  # negative priority: never auto


# --------------------------------------------------------------------------- generated pages


def test_the_config_reference_is_up_to_date(capsys):
    # catches: a config key added, removed, retyped or re-ranged without docs/reference/config.md following
    generator = load_generator("gen_config")
    assert generator.main(["--check"]) == 0, capsys.readouterr().err
    page = (DOCS / "reference" / "config.md").read_text()
    from hkd.config.schema import Config, OptimConfig

    for name in ("teacher", "schedule", "optim", "train", "eval", "logging"):
        assert f"| `{name}` |" in page
    assert "| `optim.betas` | list of float | [0.9, 0.95] | [0, 1) |" in page  # type, default and range from the field
    assert {f"stages.{s}" for s in ("attention", "hidden", "logits", "rl", "onpolicy")} <= set(
        re.findall(r"^### `(stages\.\w+)`", page, re.M))
    assert Config and OptimConfig


def test_a_field_without_a_comment_is_refused(capsys):
    # catches: a new config key that the reference would list with an empty meaning
    import dataclasses

    generator = load_generator("gen_config")

    @dataclasses.dataclass
    class Sample:
        documented: int = 1  # what it means
        bare: int = 2

    missing: list[str] = []
    lines = generator.section("x", Sample, "x.", {}, missing=missing)
    assert missing == [f"{__name__}.{Sample.__qualname__}.bare"]
    assert any("| `x.documented` | int | 1 | — | what it means |" in line for line in lines)


def test_the_benchmark_tables_are_up_to_date(capsys):
    # catches: a result file added or changed without docs/benchmarks.md following
    generator = load_generator("gen_benchmarks")
    assert generator.main(["--check"]) == 0, capsys.readouterr().err


def test_every_result_file_records_command_date_device_and_versions():
    # catches: a bench script writing a result the docs cannot cite, or a file outside its benchmark's folder
    import json

    results = DOCS.parent / "bench" / "results"
    assert not [p.name for p in results.glob("*.json")], "results go to bench/results/<benchmark>/"
    files = sorted(results.glob("*/*.json"))
    assert len(files) >= 60
    for path in files:
        data = json.loads(path.read_text())
        assert {"command", "date", "device", "versions"} <= set(data), path
        assert data["command"].startswith(("python bench/", "bash bench/")) and re.match(r"\d{4}-\d\d-\d\dT", data["date"]), path
        assert set(data["versions"]) >= {"python", "torch", "transformers", "hkd"}, path
    index = "\n".join(load_generator("gen_benchmarks").index())
    assert all(f"`{p.relative_to(results)}`" in index for p in files)  # every file is listed on the page


def test_the_bench_header_records_the_versions(tmp_path):
    # catches: bench/provenance.py losing a field the docs print
    import sys

    sys.path.insert(0, str(DOCS.parent / "bench"))
    try:
        import provenance
    finally:
        sys.path.remove(str(DOCS.parent / "bench"))
    head = provenance.header("quality.py", ["--seeds", "0"])
    assert head["command"] == "python bench/quality.py --seeds 0" and head["device"].startswith(("cpu: ", "cuda: "))
    assert head["versions"]["torch"] == torch.__version__.split("+")[0] or head["versions"]["torch"] == torch.__version__
    assert head["versions"]["hkd"].startswith("0.")


# --------------------------------------------------------------------------- every code block


BLOCKS = doc_blocks.all_blocks()


def test_the_pages_have_code_blocks_and_name_their_languages():
    # catches: a block without a language, which no check below would pick up
    assert len(BLOCKS) >= 40
    bad = [f"{b.name}: ```{b.language}" for b in BLOCKS if b.language not in doc_blocks.LANGUAGES]
    assert bad == [], "name a block's language (text for output and illustrations)"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "bash"], ids=lambda b: b.name)
def test_every_shell_command_parses(block, monkeypatch, tmp_path):
    for words in doc_blocks.commands(block.code):
        with monkeypatch.context() as patch:
            doc_blocks.check_command(words, patch, tmp_path)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "yaml"], ids=lambda b: b.name)
def test_every_yaml_block_loads_as_a_config(block):
    doc_blocks.check_yaml(block.code)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "toml"], ids=lambda b: b.name)
def test_every_toml_block_parses(block):
    doc_blocks.check_toml(block.code)


def run_python_block(block: doc_blocks.Block, tiny_run: Path, monkeypatch) -> dict:
    """Run a Python block as a reader would: hook examples as plugin modules, the rest as scripts
    in a clone whose runs/tiny/ holds a finished run of examples/tiny.yaml."""
    code = block.code
    if "@hookimpl" in code:
        module = types.ModuleType(f"docs_block_{block.line}")
        sys.modules[module.__name__] = module
        try:
            exec(compile(code, block.name, "exec"), module.__dict__)
        finally:
            del sys.modules[module.__name__]
        hooks = [v for k, v in vars(module).items() if k.startswith("hkd_add_")]
        assert hooks, f"{block.name}: a plugin example without a registration hook"
        for hook in hooks:
            specs = hook()
            assert specs and all(getattr(s, "name", None) for s in specs)
        return vars(module)
    monkeypatch.chdir(tiny_run.parent.parent)  # CLONE: runs/tiny and examples/ are here
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, block.name, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """``hkd distill examples/tiny.yaml --out runs/tiny`` in a scratch clone, one step per phase."""
    import shutil

    from hkd.config import load_config
    from hkd.train.loop import distill

    clone = tmp_path_factory.mktemp("clone")
    shutil.copytree(DOCS.parent / "examples", clone / "examples", ignore=shutil.ignore_patterns("plugin-template"))
    config = shortened(load_config(clone / "examples" / "tiny.yaml"))
    distill(config, clone / "runs" / "tiny")
    return clone / "runs" / "tiny"


def shortened(config):
    """The same run with one step per phase (the loop, stages and output are what is checked)."""
    for phase in config.schedule.phases:
        phase.steps = 1
    config.schedule.ramp_steps = 0
    config.optim.warmup_steps = 0
    config.train.checkpoint_every = 0
    return config


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "python"], ids=lambda b: b.name)
def test_every_python_block_runs(block, tiny_run, monkeypatch):
    import hkd.config

    load = hkd.config.load_config
    monkeypatch.setattr(hkd.config, "load_config", lambda *a, **k: shortened(load(*a, **k)))
    namespace = run_python_block(block, tiny_run, monkeypatch)
    if "build_run" in block.code:  # the three-part loop wrote a finished run
        assert (tiny_run.parent / "notebook" / "final" / "config.json").is_file()
    if "from_pretrained" in block.code:
        from transformers import PreTrainedModel

        models = [v for v in namespace.values() if isinstance(v, PreTrainedModel)]
        assert models and models[0].config.num_hidden_layers == 2  # the student of examples/tiny.yaml


def test_the_architecture_table_is_on_the_stages_page():
    from hkd.models.architectures import support_table

    assert support_table() in (DOCS / "stages.md").read_text(), (
        "regenerate the table: python -c 'from hkd.models.architectures import support_table; print(support_table())'")


def test_the_full_config_example_loads_with_every_stage_block_typed():
    from hkd.config import Config, from_dict

    (example,) = [b for b in doc_blocks.fenced(DOCS / "configuration.md", "yaml") if "stages:\n  attention" in b]
    config = from_dict(Config, __import__("yaml").safe_load(example))
    assert [p.name for p in config.schedule.phases] == ["structure", "feature", "decision", "rl"]
    assert config.schedule.phases[-1].lr_scale == 0.1


def test_several_teachers_and_per_phase_options_examples_load():
    # catches: snippets for teachers:/options: that the config would refuse
    import yaml

    from hkd.config import Config, from_dict

    (teachers,) = [b for b in doc_blocks.fenced(DOCS / "teachers.md", "yaml") if "teacher_weight" in b]
    config = from_dict(Config, doc_blocks.BASE_RUN | yaml.safe_load(teachers))
    assert [t.weight for t in config.teachers] == [0.5] and config.teacher.path == "/models/teacher-a"
    (phased,) = [b for b in doc_blocks.fenced(DOCS / "stages.md", "yaml") if "options: {hidden:" in b]
    config = from_dict(Config, doc_blocks.BASE_RUN | yaml.safe_load(phased))
    assert config.schedule.phases[1].options == {"hidden": {"layer_map": {"strategy": "last"}}}


def test_the_three_part_loop_example_names_real_functions():
    # catches: a loop example calling functions that do not exist (or with other arguments)
    from hkd.train import loop

    (snippet,) = [b for b in doc_blocks.fenced(DOCS / "getting-started.md", "python") if "build_run" in b]
    for name in ("build_run", "train_step", "finish"):
        assert f"{name}(" in snippet and callable(getattr(loop, name))
    assert list(__import__("inspect").signature(loop.finish).parameters) == ["run", "step", "metrics"]


def test_user_docs_speak_of_the_project_only():
    # catches: issue numbers and investigation diaries leaking into the README and the site
    for page in doc_blocks.PAGES:
        text = page.read_text()
        assert not re.search(r"(?i)\bissues? \d+|(?<![\w&`/])#\d+\b", text), page
        assert "README" not in text or page.name == "README.md", f"{page}: the docs are the reference now"
