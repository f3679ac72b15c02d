"""Third-party plugins: found through the ``hkd`` entry point, listed, used, disabled."""

import shutil
from importlib import metadata
from pathlib import Path

import pytest

from hkd.cli import main
from hkd.config import ConfigError, from_dict
from hkd.config import Config
from hkd.errors import HkdError
from hkd.plugin.hookspecs import hookimpl
from hkd.train.loop import distill
from hkd.plugin.manager import build_manager
from hkd.plugin.stage import available_stages

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "plugin-template"


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    """Make the template package visible as an installed distribution with an ``hkd`` entry point.

    A real ``pip install`` (as CI does) is used when present; otherwise a dist-info directory
    on sys.path gives importlib.metadata exactly what pip would have written.
    """
    try:
        metadata.distribution("hkd-example-plugin")
        return
    except metadata.PackageNotFoundError:
        pass
    site = tmp_path / "site"
    shutil.copytree(TEMPLATE / "hkd_example_plugin", site / "hkd_example_plugin")
    dist = site / "hkd_example_plugin-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hkd-example-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[hkd]\nexample = hkd_example_plugin\n")
    monkeypatch.syspath_prepend(str(site))


def test_builtins_are_registered_by_name():
    names = {info.name: info for info in build_manager().infos()}
    assert {"attention", "hidden", "logits"} <= set(names)
    assert names["logits"].stages == ("logits",) and names["logits"].module == "hkd.plugins.logits"


def test_entry_point_plugin_is_found_listed_and_provides_a_stage(example_plugin, capsys):
    info = {i.name: i for i in build_manager().infos()}["example"]
    assert info.module == "hkd_example_plugin"
    assert info.distribution.startswith("hkd-example-plugin 0.1.0")
    assert info.stages == ("final_cosine",)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "example" in out and "hkd-example-plugin" in out and "final_cosine" in out


def test_entry_point_stage_is_used_by_a_config_and_can_be_disabled(example_plugin, raw_config, tmp_path):
    raw_config["schedule"] = {"phases": [{"name": "only", "steps": 2, "stages": {"final_cosine": 1.0}}]}
    raw_config["stages"] = {}
    result = distill(from_dict(Config, raw_config), tmp_path / "run")
    assert result.last_metrics["loss/final_cosine"] > 0
    raw_config["plugins"] = {"disable": ["example"]}
    with pytest.raises(ConfigError, match=r"stage 'final_cosine' is not available"):
        distill(from_dict(Config, raw_config), tmp_path / "run2")


def test_disable_on_the_command_line(example_plugin, capsys):
    assert main(["stages", "--disable", "example", "--disable", "attention"]) == 0
    out = capsys.readouterr().out
    assert "final_cosine" not in out and "attention" not in out and "logits" in out


def test_disabling_an_unknown_plugin_is_an_error():
    with pytest.raises(HkdError, match=r"cannot disable unknown plugin\(s\) \['nope'\]"):
        build_manager(["nope"])


class Exploding:
    @hookimpl
    def hkd_after_step(self, step):
        raise RuntimeError("disk full")


def test_a_raising_plugin_is_named_with_its_hook(raw_config, tmp_path):
    pm = build_manager(extra_plugins=[("exploding", Exploding())])
    with pytest.raises(HkdError, match=r"plugin 'exploding' failed in hook hkd_after_step: RuntimeError\('disk full'\)"):
        distill(from_dict(Config, raw_config), tmp_path / "run", pm=pm)


def test_duplicate_stage_names_name_both_plugins():
    from hkd.plugin.stage import StageSpec

    class Clash:
        @hookimpl
        def hkd_add_stages(self):
            return [StageSpec("logits", dict, lambda c, x: None)]

    with pytest.raises(HkdError, match=r"stage 'logits' is provided by both 'clash' and 'logits'"):
        available_stages(build_manager(extra_plugins=[("clash", Clash())]))


def test_a_stage_that_raises_is_named(raw_config, tmp_path):
    from dataclasses import dataclass

    from hkd.plugin.stage import Stage, StageSpec
    from hkd import TapRequest

    @dataclass
    class Empty:
        pass

    class Broken(Stage):
        def __init__(self, config, context):
            super().__init__()

        def student_request(self):
            return TapRequest(final_hidden=True)

        def loss(self, batch, teacher, student, state):
            raise ValueError("shapes do not line up")

    class Plugin:
        @hookimpl
        def hkd_add_stages(self):
            return [StageSpec("broken", Empty, Broken)]

    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"broken": 1.0}}]}
    pm = build_manager(extra_plugins=[("brokenplugin", Plugin())])
    with pytest.raises(HkdError, match=r"stage 'broken' failed computing its loss: ValueError\('shapes do not line up'\)"):
        distill(from_dict(Config, raw_config), tmp_path / "run", pm=pm)


def test_a_runs_plugin_kernel_backends_do_not_outlive_its_plugins(raw_config, tmp_path):
    # catches: build_manager registering plugin kernel backends into the process-wide registry for good:
    # a later run without the plugin could still name the backend, and auto would still pick it
    from hkd.kernels import KernelBackend, registry

    calls = []
    reference = registry.get_backend("distill_loss", "torch").fn

    def plugged(*tensors, **options):
        calls.append(1)
        return reference(*tensors, **options)

    class Backends:
        @hookimpl
        def hkd_add_kernel_backends(self):
            return [KernelBackend("distill_loss", "plugged", plugged, priority=1000)]  # auto prefers it

    def names():
        return {row["name"] for row in registry.backends("distill_loss")}

    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]}
    raw_config["optim"]["grad_accum"] = 1
    plain = build_manager()
    with_plugin = build_manager(extra_plugins=[("k", Backends())])
    assert "plugged" in names()
    distill(from_dict(Config, raw_config), tmp_path / "plain", pm=plain)  # a run activates its own plugins'
    assert calls == [] and "plugged" not in names()
    distill(from_dict(Config, raw_config), tmp_path / "plugged", pm=with_plugin)
    assert calls
    build_manager()
    assert "plugged" not in names()
