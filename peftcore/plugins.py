"""The plugin manager: entry-point discovery and the registry of methods."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from functools import cache

import pluggy

from peftcore import hookspecs
from peftcore.method import LayerSupport, Method

hookimpl = pluggy.HookimplMarker("peftcore")
ENTRY_POINT_GROUP = "peftcore"


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name
    distribution: str
    version: str
    error: str | None = None  # why it failed to load, if it did


_pm = pluggy.PluginManager("peftcore")
_pm.add_hookspecs(hookspecs)
_plugin_infos: list[PluginInfo] = []
_loaded = False


def _load_entry_points() -> None:
    """Load every ``peftcore`` entry point; a broken plugin is recorded, not fatal."""
    if os.environ.get("PEFTCORE_DISABLE_PLUGINS"):
        return
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if _pm.has_plugin(ep.name):
            continue
        try:
            _pm.register(ep.load(), name=ep.name)
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
    """Register a plugin object by hand (tests, notebooks, in-house methods)."""
    get_plugin_manager().register(plugin, name=name)
    _invalidate()


def unregister_plugin(plugin: object = None, name: str | None = None) -> None:
    get_plugin_manager().unregister(plugin, name=name)
    _invalidate()


@cache
def methods() -> dict[str, Method]:
    """Registered methods by ``peft_type``."""
    found: dict[str, Method] = {}

    def register(method: Method) -> None:
        if method.peft_type in found and found[method.peft_type] != method:
            raise ValueError(f"Two plugins register the method {method.peft_type!r}")
        found[method.peft_type] = method

    hooks.register_methods(register=register)
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
