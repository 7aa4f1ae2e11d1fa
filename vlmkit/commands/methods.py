"""`vlmkit methods`: the registered methods with their sites and parameters (from the registry).

The built-in methods' manifests are read from `vlmkit/commands/methods_manifest.py`, generated from
the registry (`make readme`, i.e. `vlmkit methods --update-readme README.md`; a test keeps it
current), so listing them imports no torch. Plugin methods are read from the registry.
"""
from __future__ import annotations

import pprint
from pathlib import Path
from typing import Any

MANIFEST = Path(__file__).with_name("methods_manifest.py")


def register(subparsers) -> None:
    parser = subparsers.add_parser("methods", help="list the available methods and their parameters")
    parser.add_argument("name", nargs="?", help="show one method in detail")
    parser.add_argument("--markdown", action="store_true", help="print the table the README embeds")
    parser.add_argument(
        "--update-readme",
        metavar="PATH",
        help="write the methods and families tables into PATH's blocks (and regenerate the shipped method manifest)",
    )
    parser.set_defaults(func=run)


def markdown_table() -> str:
    """The methods table of the README, generated from the registry."""
    lines = ["| method | family | sites | what it does | parameters (defaults) |", "|---|---|---|---|---|"]
    for info in _live():
        params = ", ".join(f"`{name}={default}`" for name, _, default, _ in info["params"])
        name = f"[`{info['name']}`]({info['paper']})" if info["paper"] else f"`{info['name']}`"
        lines.append(f"| {name} | {info['family']} | {info['site']} | {info['summary']} | {params} |")
    return "\n".join(lines)


def families_table() -> str:
    """The README's model-family table: each adapter's model classes, what it feeds the LLM, and the
    registered methods that refuse it (with their reason)."""
    from vlmkit.adapters import ADAPTERS
    from vlmkit.registry import REGISTRY

    lines = ["| family | model classes | images / videos | methods that do not run on it |", "|---|---|---|---|"]
    for adapter in ADAPTERS:
        media = " / ".join(adapter.media)
        refused = [f"`{name}` ({REGISTRY.get(name).unsupported[adapter.family]})" for name in REGISTRY.names()
                   if adapter.family in REGISTRY.get(name).unsupported]
        classes = ", ".join(f"`{name}`" for name in adapter.model_classes)
        lines.append(f"| {adapter.family} | {classes} | {media} | {'; '.join(refused) or 'none'} |")
    return "\n".join(lines)


def manifest_source() -> str:
    """The text of `methods_manifest.py` for the methods registered now."""
    shipped = tuple(info for info in _live() if info["origin"] == "builtin")
    return (
        '"""Manifests of the built-in methods, for `vlmkit methods` without importing them.\n\n'
        "Generated from the registry by `vlmkit methods --update-readme README.md` (`make readme`); do not edit.\n"
        '"""\n\n'
        f"METHODS = {pprint.pformat(shipped, width=120, sort_dicts=False)}\n"
    )


def run(args) -> int:
    if args.update_readme:
        path = Path(args.update_readme)
        path.write_text(fill_block(fill_block(path.read_text(), "methods-table", markdown_table()), "families-table", families_table()))
        MANIFEST.write_text(manifest_source())
        return 0
    if args.markdown:
        print(markdown_table())
        return 0
    infos = _manifests()
    if args.name:
        infos = [info for info in infos if info["name"] == args.name] or [_unknown(args.name)]
    for info in infos:
        print(f"{info['name']:<12} {info['family']:<8} sites={info['site']:<14} {info['summary']}")
        if args.name:
            if info["paper"]:
                print(f"  paper: {info['paper']}")
            print(f"  origin: {info['origin']}")
        for name, kind, default, help_text in info["params"]:
            print(f"  {name}={default} ({kind}){f': {help_text}' if args.name else ''}")
    return 0


def _manifest(info) -> dict[str, Any]:
    params = tuple((p.name, p.type, repr(p.default), p.help) for p in info.params)
    return {
        "name": info.name,
        "family": info.family,
        "site": info.site,
        "summary": info.summary,
        "paper": info.paper,
        "params": params,
        "origin": info.origin,
    }


def _live() -> list[dict[str, Any]]:
    from vlmkit.registry import list_methods

    return [_manifest(info) for info in list_methods()]


def _manifests() -> list[dict[str, Any]]:
    """Every method's manifest: built-ins from the shipped file, the others from the registry."""
    from vlmkit.commands.methods_manifest import METHODS
    from vlmkit.registry import REGISTRY

    shipped = {info["name"]: info for info in METHODS}
    return [shipped[name] if name in shipped else _manifest(REGISTRY.info(name)) for name in REGISTRY.names()]


def _unknown(name: str):
    from vlmkit.registry import REGISTRY

    return REGISTRY.info(name)  # raises UnknownMethodError with the valid names


def fill_block(text: str, marker: str, content: str) -> str:
    """Replace what stands between ``<!-- marker -->`` and ``<!-- /marker -->`` in `text`."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content}\n{end}{tail}"
