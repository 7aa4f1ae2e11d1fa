"""`vlmkit methods`: the registered methods with their sites and parameters (from the registry)."""
from __future__ import annotations

from vlmkit.registry import list_methods


def register(subparsers) -> None:
    parser = subparsers.add_parser("methods", help="list the available methods and their parameters")
    parser.add_argument("name", nargs="?", help="show one method in detail")
    parser.set_defaults(func=run)


def run(args) -> int:
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
