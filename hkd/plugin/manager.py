"""The plugin manager: built-ins and entry-point plugins, registered the same way."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Generator, Iterable

import pluggy
from pluggy import HookImpl

from hkd.plugin import hookspecs
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
    "generation": "hkd.plugins.generation",
    "augment": "hkd.plugins.augment",
    "onpolicy": "hkd.plugins.onpolicy",
    "mlm": "hkd.plugins.mlm",
    "sentence": "hkd.plugins.sentence",
    "console": "hkd.plugins.console",
}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    distribution: str
    stages: tuple[str, ...]


class HkdPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from and names it when it fails.

    Hooks are called through pluggy itself (``pm.hook.<name>(...)``), so ``firstresult``,
    ``wrapper=True`` implementations, ``tryfirst``/``trylast`` and tracing all behave as
    pluggy documents. Each implementation is wrapped once at registration so that an exception
    it raises becomes an :class:`HkdError` naming the plugin and the hook.
    """

    def __init__(self) -> None:
        super().__init__("hkd")
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, str] = {}  # plugin name -> distribution
        self._item_owner: list[tuple[Any, str]] = []  # (item a registration hook returned, its plugin)
        self.kernel_backends: list[Any] = []  # its plugins' kernel backends (hkd.kernels.registry.KernelBackend)

    def activate_kernel_backends(self) -> None:
        """Make this manager's plugins' kernel backends the registry's plugin layer (a run calls it at
        its start), replacing whatever another manager installed: registrations do not leak between runs."""
        from hkd.kernels import registry

        registry.set_plugin_backends(self.kernel_backends)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        plugin_name = super().register(plugin, name)
        if plugin_name is not None:
            for caller in self.get_hookcallers(plugin) or []:
                for impl in caller.get_hookimpls():
                    if impl.plugin is plugin:  # pluggy calls impl.function: wrap it in place
                        setattr(impl, "function", self._named(impl, caller.name))
        return plugin_name

    def _named(self, impl: HookImpl, hook_name: str) -> Callable[..., Any]:
        """``impl.function`` raising errors that name plugin and hook; items it returns are attributed."""
        function: Callable[..., Any] = impl.function
        plugin_name = impl.plugin_name

        def fail(exc: Exception) -> HkdError:
            return HkdError(f"plugin {plugin_name!r} failed in hook {hook_name}: {exc!r}")

        def attribute(result: Any) -> Any:
            if hook_name.startswith("hkd_add_") and isinstance(result, list):
                known = {id(item) for item, _ in self._item_owner}
                self._item_owner.extend((item, plugin_name) for item in result if id(item) not in known)
            return result

        if impl.wrapper or impl.hookwrapper:  # a generator: pluggy drives it with send/throw
            def wrapped_generator(*args: Any) -> Any:
                try:
                    generator: Generator[Any, Any, Any] = function(*args)
                    return attribute((yield from generator))
                except HkdError:
                    raise  # an inner implementation's error, already named
                except Exception as exc:
                    raise fail(exc) from exc

            return wrapped_generator

        def wrapped(*args: Any) -> Any:
            try:
                return attribute(function(*args))
            except HkdError:
                raise
            except Exception as exc:  # a broken plugin must be named, not buried in a traceback
                raise fail(exc) from exc

        return wrapped

    def collect(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call a registration hook through pluggy; ``(plugin_name, item)`` for every item returned."""
        results = getattr(self.hook, hook_name)(**kwargs)
        owners = {id(item): owner for item, owner in self._item_owner}
        return [(owners.get(id(item), "?"), item) for items in results for item in items or []]

    def named(self, hook_name: str, what: str, spec_type: type | None = None) -> dict[str, Any]:
        """Every spec a registration hook returns, by its ``name``: the one registry mechanism behind
        stages, verifiers, generation backends and prompt transforms. One name from two plugins is an
        error naming both; with ``spec_type``, anything else returned is an error naming the plugin."""
        specs: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for plugin_name, spec in self.collect(hook_name):
            if spec_type is not None and not isinstance(spec, spec_type):
                raise HkdError(f"plugin {plugin_name!r}: {hook_name} returned {spec!r}, not a hkd.{spec_type.__name__}")
            if spec.name in specs:
                first, second = sorted((owners[spec.name], plugin_name))
                raise HkdError(f"{what} {spec.name!r} is provided by both {first!r} and {second!r}")
            specs[spec.name] = spec
            owners[spec.name] = plugin_name
        return specs

    def call(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a lifecycle hook through pluggy (errors name the plugin)."""
        return getattr(self.hook, hook_name)(**kwargs)

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
    Then make its plugins' kernel backends the kernel registry's plugin layer (replacing the
    previous manager's: :meth:`HkdPluginManager.activate_kernel_backends`).
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
            named = dataclasses.replace(backend, fn=_named_backend(backend.fn, backend.name, backend.op, plugin_name))
            registry.check_backend(named)
        except Exception as exc:
            raise HkdError(f"plugin {plugin_name!r} returned an invalid kernel backend: {exc}") from exc
        pm.kernel_backends.append(named)
    pm.activate_kernel_backends()


def _named_backend(fn: Callable[..., Any], name: str, op: str, plugin_name: str) -> Callable[..., Any]:
    """A plugin's kernel function whose errors name the backend and the plugin that provides it.
    ``functools.wraps`` keeps its signature readable: the registry passes a backend only the
    options its function declares."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HkdError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":  # torch's; the loop turns it into advice
                raise
            raise HkdError(f"kernel backend {name!r} for {op} (plugin {plugin_name!r}) failed: {exc!r}") from exc

    return run
