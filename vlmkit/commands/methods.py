"""`vlmkit methods`: the registered methods with their sites and parameters (from the registry)."""
from __future__ import annotations

from pathlib import Path

from vlmkit.registry import list_methods


def register(subparsers) -> None:
    parser = subparsers.add_parser("methods", help="list the available methods and their parameters")
    parser.add_argument("name", nargs="?", help="show one method in detail")
    parser.add_argument("--markdown", action="store_true", help="print the table the README embeds")
    parser.add_argument("--update-readme", metavar="PATH", help="write the table into PATH's methods-table block")
    parser.set_defaults(func=run)


def markdown_table() -> str:
    """The methods table of the README, generated from the registry."""
    lines = ["| method | family | site | what it does | parameters (defaults) |", "|---|---|---|---|---|"]
    for info in list_methods():
        params = ", ".join(f"`{p.name}={p.default!r}`" for p in info.params)
        name = f"[`{info.name}`]({info.paper})" if info.paper else f"`{info.name}`"
        lines.append(f"| {name} | {info.family} | {info.site} | {info.summary} | {params} |")
    return "\n".join(lines)


def run(args) -> int:
    if args.update_readme:
        path = Path(args.update_readme)
        path.write_text(fill_block(path.read_text(), "methods-table", markdown_table()))
        return 0
    if args.markdown:
        print(markdown_table())
        return 0
    infos = list_methods()
    if args.name:
        infos = [info for info in infos if info.name == args.name] or [_unknown(args.name)]
    for info in infos:
        print(f"{info.name:<12} {info.family:<8} site={info.site:<8} {info.summary}")
        if args.name:
            if info.paper:
                print(f"  paper: {info.paper}")
            print(f"  origin: {info.origin}")
            for param in info.params:
                print(f"  {param.name}={param.default!r} ({param.type}): {param.help}")
    return 0


def _unknown(name: str):
    from vlmkit.registry import REGISTRY

    return REGISTRY.info(name)  # raises UnknownMethodError with the valid names


def fill_block(text: str, marker: str, content: str) -> str:
    """Replace what stands between ``<!-- marker -->`` and ``<!-- /marker -->`` in `text`."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content}\n{end}{tail}"
