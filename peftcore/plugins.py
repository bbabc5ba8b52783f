"""The plugin manager: entry-point discovery, checks on each plugin, and the registry of methods."""

from __future__ import annotations

import difflib
import importlib.metadata
import os
from dataclasses import dataclass
from functools import cache

import pluggy

from peftcore import hookspecs
from peftcore.errors import PeftError
from peftcore.method import LayerSupport, Method
from peftcore.version import HOOKSPEC_VERSION, SUPPORTED_HOOKSPEC_VERSIONS

hookimpl = pluggy.HookimplMarker("peftcore")
ENTRY_POINT_GROUP = "peftcore"
HOOK_NAMES = frozenset(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "peftcore_spec"))


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name
    distribution: str
    version: str
    error: str | None = None  # why it is not in use, if it is not


class PluginError(PeftError, ValueError):
    """A plugin that cannot be used: a misspelt hook, a hookspec version this peftcore lacks, a clashing method."""


_pm = pluggy.PluginManager("peftcore")
_pm.add_hookspecs(hookspecs)
_plugin_infos: list[PluginInfo] = []
_loaded = False


def _declared_version(plugin: object) -> object:
    return getattr(plugin, "PEFTCORE_HOOKSPEC_VERSION", 1)


def _unknown_hooks(plugin: object) -> list[str]:
    return [caller.name for caller in _pm.get_hookcallers(plugin) or [] if caller.spec is None]


def _describe_unknown(name: str) -> str:
    close = difflib.get_close_matches(name, HOOK_NAMES, n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def _undecorated_hooks(plugin: object) -> list[str]:
    """Functions of the plugin's own module named like a hook but not marked ``@hookimpl`` (never called)."""
    implemented = {caller.name for caller in _pm.get_hookcallers(plugin) or []}
    home = getattr(plugin, "__name__", type(plugin).__module__)
    return [name for name in sorted(HOOK_NAMES - implemented)
            if callable(getattr(plugin, name, None)) and getattr(getattr(plugin, name), "__module__", None) == home]


def _problem(plugin: object) -> str | None:
    unknown = _unknown_hooks(plugin)
    if unknown:
        return (f"hook implementations that match no peftcore hook: {', '.join(map(_describe_unknown, unknown))}; "
                f"peftcore (hookspec version {HOOKSPEC_VERSION}) knows {', '.join(sorted(HOOK_NAMES))}")
    undecorated = _undecorated_hooks(plugin)
    if undecorated:
        return f"defines {', '.join(undecorated)} without @peftcore.hookimpl, so peftcore would never call it"
    return _clashing_method(plugin)


def _clashing_method(plugin: object) -> str | None:
    """A ``peft_type`` this plugin registers that another registered plugin registers already."""
    mine = _methods_of(plugin)
    if not mine:
        return None
    for other in _pm.get_plugins():
        if other is plugin:
            continue
        taken = {m.peft_type for m in _methods_of(other)}
        for method in mine:
            if method.peft_type in taken:
                return (f"registers the method {method.peft_type!r}, which plugin {_pm.get_name(other)!r} registers "
                        "already; uninstall one of the two")
    return None


def _methods_of(plugin: object) -> list[Method]:
    found: list[Method] = []
    for impl in _pm.hook.register_methods.get_hookimpls():
        if impl.plugin is plugin:
            impl.function(register=found.append)
    return found


def _register_checked(plugin: object, name: str | None) -> None:
    """Register ``plugin``, or raise PluginError (leaving it unregistered) when it cannot be used as it is."""
    declared = _declared_version(plugin)
    if declared not in SUPPORTED_HOOKSPEC_VERSIONS:
        raise PluginError(
            f"written for peftcore hookspec version {declared!r}; this peftcore (hookspec version "
            f"{HOOKSPEC_VERSION}) supports {', '.join(map(str, SUPPORTED_HOOKSPEC_VERSIONS))}: install a matching "
            "peftcore or plugin release"
        )
    _pm.register(plugin, name=name)
    try:
        problem = _problem(plugin)
    except Exception:  # e.g. register_methods itself fails when asked
        _pm.unregister(plugin)
        raise
    if problem:
        _pm.unregister(plugin)
        raise PluginError(problem)


def _load_entry_points() -> None:
    """Load every ``peftcore`` entry point; a plugin that cannot be used is recorded, not fatal."""
    if os.environ.get("PEFTCORE_DISABLE_PLUGINS"):
        return
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if _pm.has_plugin(ep.name):
            continue
        try:
            _register_checked(ep.load(), ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            _plugin_infos.append(PluginInfo(ep.name, dist, version, f"{type(exc).__name__}: {exc}"))
            continue
        _plugin_infos.append(PluginInfo(ep.name, dist, version))


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager, with the built-ins and every installed plugin loaded.

    Loading waits for the first use so that plugins can ``import peftcore`` freely.
    """
    global _loaded
    if not _loaded:
        _loaded = True
        from peftcore import default_hooks

        _pm.register(default_hooks, name="peftcore.default_hooks")
        _load_entry_points()
    return _pm


class _Hooks:
    """``hooks.<name>(...)`` calls a hook on the loaded plugin manager."""

    def __getattr__(self, name: str):
        return getattr(get_plugin_manager().hook, name)


hooks = _Hooks()


def plugin_infos() -> list[PluginInfo]:
    get_plugin_manager()
    return list(_plugin_infos)


def _invalidate() -> None:
    methods.cache_clear()
    layer_supports.cache_clear()


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object by hand (tests, notebooks, in-house methods); PluginError if it cannot be used."""
    get_plugin_manager()
    try:
        _register_checked(plugin, name)
    finally:
        _invalidate()


def unregister_plugin(plugin: object = None, name: str | None = None) -> None:
    get_plugin_manager().unregister(plugin, name=name)
    _invalidate()


@cache
def methods() -> dict[str, Method]:
    """Registered methods by ``peft_type`` (plugins registering a taken one were refused at load)."""
    found: dict[str, Method] = {}
    hooks.register_methods(register=lambda method: found.setdefault(method.peft_type, method))
    return found


@cache
def layer_supports() -> tuple[LayerSupport, ...]:
    found: list[LayerSupport] = []
    hooks.register_layer_support(register=found.append)
    return tuple(found)


def no_methods_hint() -> str:
    return (
        "No peftcore method plugin is installed. Install one, e.g. "
        "`pip install ./plugins/peftcore-lora` (from a checkout) or `pip install peftcore-lora`."
    )


def get_method(peft_type_or_name: str) -> Method:
    """Look a method up by ``peft_type`` ("LORA") or user-facing name ("lora")."""
    registered = methods()
    key = str(getattr(peft_type_or_name, "value", peft_type_or_name))
    for method in registered.values():
        if key.upper() == method.peft_type or key.lower() == method.name:
            return method
    if not registered:
        raise ValueError(f"Unknown PEFT method {key!r}. {no_methods_hint()}")
    known = ", ".join(f"{m.name} ({m.peft_type})" for m in registered.values())
    raise ValueError(f"Unknown PEFT method {key!r}; installed methods: {known}")


def method_for_config(config: object) -> Method:
    return get_method(config.peft_type)


def find_config_class(class_name: str) -> type | None:
    for method in methods().values():
        if method.config_class.__name__ == class_name:
            return method.config_class
    return None


def pick_layer_support(peft_type: str, module, config) -> LayerSupport | None:
    """The most specific registered wrapper for ``module`` (see ``register_layer_support``)."""
    best, best_rank = None, None
    for support in layer_supports():
        if support.peft_type != peft_type:
            continue
        distance = support.distance(module)
        if distance is None or (support.accepts is not None and not support.accepts(module, config)):
            continue
        rank = (distance, -support.priority)
        if best_rank is None or rank <= best_rank:  # on a full tie the later registration wins
            best, best_rank = support, rank
    return best
