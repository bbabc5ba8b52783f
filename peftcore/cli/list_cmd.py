"""``peftcore list``: installed methods, where they come from, what they support and hook into."""

from __future__ import annotations

import json

import click

from peftcore.cli.render import table


def method_rows() -> tuple[list[dict], list[dict]]:
    """(methods, broken plugins) as plain dicts, one per method / per plugin that failed to load."""
    from peftcore import HOOKSPEC_VERSION  # noqa: F401  (import also loads the plugin machinery)
    from peftcore.plugins import get_plugin_manager, plugin_infos

    pm = get_plugin_manager()
    infos = {info.name: info for info in plugin_infos()}
    found, errors = [], []
    for impl in pm.hook.register_methods.get_hookimpls():
        registered = []
        info = infos.get(impl.plugin_name)
        try:
            impl.function(register=registered.append)  # ask this plugin alone which methods it brings
        except Exception as exc:  # a plugin that imports but breaks when asked is still listed
            errors.append({"plugin": impl.plugin_name, "distribution": info.distribution if info else "-",
                           "version": info.version if info else "-", "error": f"{type(exc).__name__}: {exc}"})
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(impl.plugin) or [])
        for method in registered:
            found.append({
                "name": method.name, "peft_type": method.peft_type, "kind": method.kind,
                "config_class": method.config_class.__name__,
                "distribution": info.distribution if info else "(registered in-process)",
                "version": info.version if info else "-",
                "plugin": impl.plugin_name,
                "task_types": list(method.task_types) or ["all"],
                "hooks": hooks, "description": method.description,
            })
    broken = [{"plugin": i.name, "distribution": i.distribution, "version": i.version, "error": i.error}
              for i in infos.values() if i.error] + errors
    return sorted(found, key=lambda m: m["name"]), broken


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def list_methods(as_json: bool) -> None:
    """List the installed PEFT methods (one plugin package each)."""
    from peftcore import HOOKSPEC_VERSION
    from peftcore.plugins import no_methods_hint

    found, broken = method_rows()
    if as_json:
        click.echo(
            json.dumps({"hookspec_version": HOOKSPEC_VERSION, "methods": found, "broken_plugins": broken}, indent=2)
        )
        return
    if found:
        rows = [
            [m["name"], m["peft_type"], m["kind"], f"{m['distribution']} {m['version']}", ", ".join(m["task_types"])]
            for m in found
        ]
        click.echo(table(rows, ["method", "peft_type", "kind", "plugin", "task types"]))
        click.echo("\nhooks implemented:")
        for plugin in sorted({(m["plugin"], ", ".join(m["hooks"])) for m in found}):
            click.echo(f"  {plugin[0]}: {plugin[1]}")
    else:
        click.echo(no_methods_hint())
    if broken:
        click.echo("\nplugins that failed to load (their methods are unavailable):")
        for b in broken:
            click.echo(f"  {b['plugin']} ({b['distribution']} {b['version']}): {b['error']}")
