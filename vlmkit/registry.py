"""The method registry: `@register_method`, lazy built-ins, and the `vlmkit.methods` entry-point group.

Built-in methods are listed as lazy ``"module:attr"`` targets so that `list_methods()` and the CLI can
describe every method without importing torch-heavy code until one is used. Third-party packages add
methods through the entry-point group ``vlmkit.methods`` (see `plugins/vlmkit-example-method`).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from vlmkit.errors import ConfigError, ConflictError, UnknownMethodError, did_you_mean

ENTRY_POINT_GROUP = "vlmkit.methods"

_BUILTIN_TARGETS = {
    "fastv": "vlmkit.methods.prune.fastv:FastV",
    "visionzip": "vlmkit.methods.prune.visionzip:VisionZip",
    "random": "vlmkit.methods.prune.random:RandomPrune",
    "pool": "vlmkit.methods.prune.pool:Pool",
    "divprune": "vlmkit.methods.prune.divprune:DivPrune",
    "fastervlm": "vlmkit.methods.prune.fastervlm:FasterVLM",
    "fopru": "vlmkit.methods.prune.fopru:FoPru",
    "cdpruner": "vlmkit.methods.prune.cdpruner:CDPruner",
    "todre": "vlmkit.methods.prune.todre:ToDRE",
    "pyramiddrop": "vlmkit.methods.prune.pyramiddrop:PyramidDrop",
    "dart": "vlmkit.methods.prune.dart:DART",
    "vtc_cls": "vlmkit.methods.prune.vtc_cls:VTCCLS",
    "prumerge": "vlmkit.methods.prune.prumerge:PruMerge",
    "prumerge_plus": "vlmkit.methods.prune.prumerge:PruMergePlus",
    "downsample": "vlmkit.methods.prune.downsample:Downsample",
    "globalcom2": "vlmkit.methods.prune.globalcom2:GlobalCom2",
    "mustdrop": "vlmkit.methods.prune.mustdrop:MustDrop",
    "sparsevlm": "vlmkit.methods.prune.sparsevlm:SparseVLM",
    "evs": "vlmkit.methods.video.evs:EVS",
    "dycoke": "vlmkit.methods.video.dycoke:DyCoke",
    "holitom": "vlmkit.methods.video.holitom:HoliTom",
    "lookm": "vlmkit.methods.video.lookm:LookM",
    "fastvid": "vlmkit.methods.video.fastvid:FastVID",
    "vcd": "vlmkit.methods.decode.vcd:VCD",
    "icd": "vlmkit.methods.decode.icd:ICD",
    "m3id": "vlmkit.methods.decode.m3id:M3ID",
    "ritual": "vlmkit.methods.decode.ritual:RITUAL",
    "dola": "vlmkit.methods.decode.dola:DoLa",
    "lol": "vlmkit.methods.decode.lol:LOL",
    "debias": "vlmkit.methods.decode.debias:Debias",
    "shortv": "vlmkit.methods.depth.shortv:ShortV",
    "vtw": "vlmkit.methods.depth.vtw:VTW",
    "mod": "vlmkit.methods.depth.mod:MoD",
    "pmod": "vlmkit.methods.depth.pmod:PMoD",
    "gammamod": "vlmkit.methods.depth.gammamod:GammaMoD",
    "tome": "vlmkit.methods.merge.tome:ToMe",
    "dymu": "vlmkit.methods.merge.dymu:DyMU",
    "v2pe": "vlmkit.methods.position.v2pe:V2PE",
    "cca": "vlmkit.methods.position.cca:CCA",
    "hope": "vlmkit.methods.position.hope:HoPE",
}


@dataclass(frozen=True)
class ParamInfo:
    """One configurable parameter of a method, as shown by `list_methods()` and `vlmkit methods`."""

    name: str
    type: str
    default: Any
    help: str


@dataclass(frozen=True)
class MethodInfo:
    """The static manifest of a registered method."""

    name: str
    family: str
    sites: tuple[str, ...]
    summary: str
    paper: str
    params: tuple[ParamInfo, ...]
    origin: str

    @property
    def site(self) -> str:
        """The sites as one string, e.g. ``"vision, embeds"``."""
        return ", ".join(self.sites)


class Registry:
    """Name -> method class, with lazy built-ins and entry-point plugins.

    Example:
        >>> from vlmkit.registry import REGISTRY
        >>> REGISTRY.get("fastv").__name__
        'FastV'
    """

    def __init__(self, targets: dict[str, str] | None = None, group: str = ENTRY_POINT_GROUP):
        self._targets: dict[str, str] = dict(targets or {})
        self._classes: dict[str, type] = {}
        self._origins: dict[str, str] = {name: "builtin" for name in self._targets}
        self._group = group
        self._entry_points_loaded = False
        self._frozen = False

    def register(self, name: str, cls: type, *, origin: str = "builtin") -> None:
        """Register `cls` under `name`; a second, different class under one name is an error."""
        from vlmkit.methods.base import Method

        if self._frozen:
            raise ConflictError(f"the method registry is frozen; cannot register {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} registered as {name!r} must subclass vlmkit.methods.Method")
        existing = self._classes.get(name)
        if existing is not None and existing is not cls:
            raise ConflictError(
                f"method {name!r} is already registered by {existing.__module__}.{existing.__qualname__} "
                f"({self._origins.get(name)}); choose another name for {cls.__module__}.{cls.__qualname__}"
            )
        self._classes[name] = cls
        self._origins.setdefault(name, origin)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry_point in metadata.entry_points(group=self._group):
            if entry_point.name in self._classes or entry_point.name in self._targets:
                continue
            self._targets[entry_point.name] = entry_point.value
            self._origins[entry_point.name] = f"plugin {entry_point.dist.name if entry_point.dist else '?'}"

    def names(self) -> list[str]:
        """All method names (built-in, decorated and plugin), sorted."""
        self._load_entry_points()
        return sorted(set(self._targets) | set(self._classes))

    def get(self, name: str) -> type:
        """The method class registered as `name`, importing it on first use."""
        if name in self._classes:
            return self._classes[name]
        self._load_entry_points()
        target = self._targets.get(name)
        if target is None:
            raise UnknownMethodError(
                f"unknown method {name!r}.{did_you_mean(name, self.names())} "
                f"Valid methods: {', '.join(self.names())}."
            )
        module_name, _, attr = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except Exception as error:  # a plugin that fails to load is an error naming it
            raise ImportError(f"method {name!r} ({self._origins.get(name)}) failed to load from {target!r}: {error}") from error
        if name not in self._classes:
            self.register(name, cls, origin=self._origins.get(name, "builtin"))
        return self._classes[name]

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origins.get(name, "builtin")

    def info(self, name: str) -> MethodInfo:
        """The manifest of one method (family, site, parameters with defaults and help)."""
        cls = self.get(name)
        params = tuple(
            ParamInfo(f.name, _type_name(f.type), _default_of(f), f.metadata.get("help", ""))
            for f in dataclasses.fields(cls.Config)
        )
        doc = (cls.__doc__ or "").strip().splitlines()
        return MethodInfo(name, cls.family, cls.sites, doc[0] if doc else "", cls.paper, params, self.origin(name))

    def freeze(self) -> None:
        self._frozen = True

    def clear(self) -> None:
        """Forget decorated and plugin classes (tests only); built-ins reload lazily."""
        self._classes.clear()
        self._targets = dict(_BUILTIN_TARGETS)
        self._origins = {name: "builtin" for name in self._targets}
        self._entry_points_loaded = False
        self._frozen = False


def _type_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


REGISTRY = Registry(_BUILTIN_TARGETS)


def register_method(name: str, *, family: str, sites: str | tuple[str, ...] | None = None, site: str | None = None):
    """Class decorator registering a method under `name` (lowercase snake case, same as its file name).

    Args:
        name: the registered name.
        family: "prune", "depth", "position", "decode", ...
        sites: the engine sites the method acts at (`vlmkit.engine.sites.SITES`), e.g.
            ``("vision", "embeds")``; `site` is the same for a single site.

    Example:
        >>> @register_method("my_prune", family="prune", sites="embeds")   # doctest: +SKIP
        ... class MyPrune(TokenSelector): ...
    """
    from vlmkit.engine.sites import SITES

    if (sites is None) == (site is None):
        raise ConfigError(f"method {name!r}: give its sites as sites=(...) (or one site=...), exactly once")
    declared = (sites,) if isinstance(sites, str) else tuple(sites if sites is not None else (site,))
    unknown = [s for s in declared if s not in SITES]
    if not declared or unknown:
        raise ConfigError(
            f"method {name!r} declares {'no site' if not declared else f'unknown site(s) {unknown}'}; "
            f"sites are {', '.join(SITES)}"
        )
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ConfigError(f"method name {name!r} must be lowercase snake case")

    def decorate(cls: type) -> type:
        cls.name, cls.family, cls.sites = name, family, declared
        REGISTRY.register(name, cls, origin="builtin" if cls.__module__.startswith("vlmkit.") else cls.__module__)
        return cls

    return decorate


def list_methods() -> list[MethodInfo]:
    """Manifests of every available method, built-in and plugin, sorted by name."""
    return [REGISTRY.info(name) for name in REGISTRY.names()]
