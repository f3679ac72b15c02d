"""The plugin manager: built-ins and entry-point plugins, registered the same way."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterable

import pluggy

from hkd import hookspecs
from hkd.errors import HkdError

ENTRY_POINT_GROUP = "hkd"

# Built-in plugins, by the name a config uses to disable them.
BUILTIN_PLUGINS: dict[str, str] = {
    "attention": "hkd.plugins.attention",
    "hidden": "hkd.plugins.hidden",
    "logits": "hkd.plugins.logits",
    "jsonl": "hkd.plugins.loggers",
    "tensorboard": "hkd.plugins.tensorboard_logger",
    "wandb": "hkd.plugins.wandb_logger",
    "verifiers": "hkd.plugins.verifiers",
    "sft": "hkd.plugins.sft",
    "rl": "hkd.plugins.rl",
    "uld": "hkd.plugins.uld",
    "console": "hkd.plugins.console",
}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    distribution: str
    stages: tuple[str, ...]


class HkdPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__("hkd")
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, str] = {}  # plugin name -> distribution

    def collect(self, hook_name: str) -> list[tuple[str, Any]]:
        """Call a registration hook and return ``(plugin_name, item)`` for every item returned."""
        items: list[tuple[str, Any]] = []
        for impl in getattr(self.hook, hook_name).get_hookimpls():
            try:
                result = impl.function()
            except Exception as exc:  # a broken plugin must be named, not buried in a traceback
                raise HkdError(f"plugin {impl.plugin_name!r} failed in hook {hook_name}: {exc!r}") from exc
            for item in result or []:
                items.append((impl.plugin_name, item))
        return items

    def call(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook, naming the plugin if one raises."""
        for impl in reversed(getattr(self.hook, hook_name).get_hookimpls()):
            args = {name: kwargs[name] for name in impl.argnames}
            try:
                impl.function(**args)
            except HkdError:
                raise
            except Exception as exc:
                raise HkdError(f"plugin {impl.plugin_name!r} failed in hook {hook_name}: {exc!r}") from exc

    def infos(self) -> list[PluginInfo]:
        stage_owner: dict[str, list[str]] = {}
        for plugin_name, spec in self.collect("hkd_add_stages"):
            stage_owner.setdefault(plugin_name, []).append(spec.name)
        out = []
        for name, plugin in self.list_name_plugin():
            module = getattr(plugin, "__name__", type(plugin).__module__)
            out.append(PluginInfo(name, module, self.origins.get(name, "?"), tuple(stage_owner.get(name, []))))
        return out


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def build_manager(disable: Iterable[str] = (), extra_plugins: Iterable[tuple[str, object]] = ()) -> HkdPluginManager:
    """Register built-ins and entry-point plugins, except those named in ``disable``.

    ``extra_plugins`` lets tests and notebooks register plain objects without packaging them.
    Then push every plugin's kernel backends into the kernel registry.
    """
    disabled = set(disable)
    pm = HkdPluginManager()
    known: set[str] = set(BUILTIN_PLUGINS)
    for name, module_name in BUILTIN_PLUGINS.items():
        if name not in disabled:
            pm.register(importlib.import_module(module_name), name=name)
            pm.origins[name] = "hkd (built-in)"
    for ep in _entry_points():
        known.add(ep.name)
        if ep.name in disabled:
            continue
        if pm.has_plugin(ep.name):
            raise HkdError(f"entry point {ep.value!r} uses the plugin name {ep.name!r}, which is already taken")
        try:
            plugin = ep.load()
        except Exception as exc:
            raise HkdError(f"could not load plugin {ep.name!r} from entry point {ep.value!r}: {exc!r}") from exc
        pm.register(plugin, name=ep.name)
        dist = getattr(ep, "dist", None)
        pm.origins[ep.name] = f"{dist.name} {dist.version}" if dist is not None else "?"
    for name, plugin in extra_plugins:
        known.add(name)
        if name not in disabled:
            pm.register(plugin, name=name)
            pm.origins[name] = "(registered in code)"
    unknown = disabled - known
    if unknown:
        raise HkdError(f"cannot disable unknown plugin(s) {sorted(unknown)}; installed: {sorted(known)}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise HkdError(f"plugin {exc.plugin!r} implements a hook hkd does not define: {exc}") from exc
    _register_kernel_backends(pm)
    return pm


def _register_kernel_backends(pm: HkdPluginManager) -> None:
    from hkd.kernels import registry

    for plugin_name, backend in pm.collect("hkd_add_kernel_backends"):
        try:
            registry.register_backend(backend, replace=True)
        except Exception as exc:
            raise HkdError(f"plugin {plugin_name!r} returned an invalid kernel backend: {exc}") from exc
