"""Pass configs and the pass registry.

A pass is a dataclass of options (its config) registered under a short name; its JSON form is
`{"_type": name, "_version": n, "_data": {...}}`, which is what `surgeon.json` stores and what a
reload replays. The faces find passes here by name: the built-in ones from the `passes` package
(also from a source tree that was never installed), third-party ones from the `surgeon.passes`
entry-point group (`name = "pkg.module"`, a module that registers its config on import).
A built-in name cannot be taken over by a plug-in (the plug-in's pass is skipped with a
warning), and a plug-in that fails to load is reported once, as a warning naming its entry
point, and skipped: the other passes keep working. A recipe can only name installed passes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import math
import numbers
import typing
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from surgeon.errors import SurgeonError, SurgeonWarning

if TYPE_CHECKING:
    from surgeon.graph.rewrite import Surgery


class PassError(SurgeonError):
    """An unknown pass, a bad pass option, or passes combined in an order that cannot work."""


@dataclass(frozen=True)
class Bounds:
    """The range a numeric pass option must lie in (`None`: unbounded on that side); `open_low`
    / `open_high` exclude the end itself. Every numeric option must also be finite."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.open_high else ']'}")
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.open_high else '<='} {self.high:g}"
        return "any finite number"


def bounded(default: Any, low: float | None = None, high: float | None = None, *,
            open_low: bool = False, open_high: bool = False) -> Any:
    """A dataclass field for a numeric pass option whose value must lie in a range, checked when
    the config is built (before any model is read): `epsilon: float = bounded(1e-8, 0, 1,
    open_low=True)`."""
    return dataclasses.field(default=default,
                             metadata={"bounds": Bounds(low, high, open_low, open_high)})


def option_error(config: PassConfig | type[PassConfig], option: str, value: Any,
                 allowed: str) -> PassError:
    """The one-line error for a pass option out of range: names the pass, the option, the
    value and what is allowed."""
    return PassError(f"pass {config.name!r}: option {option!r} = {value!r} is out of range "
                     f"(allowed: {allowed})")


def check_options(config: PassConfig) -> None:
    """Refuse option values of the wrong type, not finite (NaN, inf) or outside the field's
    `bounded` range, and Literal options that are none of their choices."""
    try:
        hints = typing.get_type_hints(type(config))
    except Exception:  # noqa: BLE001 - a plug-in's hints that cannot be resolved: ranges only
        hints = {}
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints.get(f.name)
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            continue
        kinds = {a for a in (hint, *args) if a in (int, float)}
        if kinds:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
                    kinds == {int} and not isinstance(value, numbers.Integral)):
                kind = "an int" if kinds == {int} else "a number"
                raise PassError(f"pass {config.name!r}: option {f.name!r} must be {kind}, got "
                                f"{value!r}")
            bounds = f.metadata.get("bounds", Bounds())
            if not math.isfinite(value) or value not in bounds:
                finite = "" if isinstance(value, numbers.Integral) else "finite, "
                raise option_error(config, f.name, value, f"{finite}{bounds}"
                                   if str(bounds) != "any finite number" else str(bounds))
        elif typing.get_origin(hint) is typing.Literal and value not in args:
            raise option_error(config, f.name, value, ", ".join(map(str, args)))
        elif hint is bool and not isinstance(value, bool):
            raise PassError(f"pass {config.name!r}: option {f.name!r} must be true or false, "
                            f"got {value!r}")


_REGISTRY: dict[str, type[PassConfig]] = {}
_BUILTIN = "passes"
_loaded = False


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: `include` / `exclude` are fnmatch patterns of qualified module
    names (empty `include` = everything). Subclasses set `name` and `version`."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    # What the pass rewrites, for messages: "found no residual adds in scope".
    rewrites: ClassVar[str] = "modules it rewrites"
    # Passes this one must run before (it cannot see what they leave behind), and why.
    runs_before: ClassVar[tuple[str, ...]] = ()
    runs_before_reason: ClassVar[str] = ""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check every option (types, finite, in range; `check_options`). A subclass with its
        own `__post_init__` calls this one first."""
        check_options(self)

    def run(self, surgery: Surgery) -> list[str]:
        """Edit `surgery`'s graphs and modules; return the qualified names of the modules the
        pass created or replaced (the manifest)."""
        raise NotImplementedError

    def resolved(self, surgery: Surgery) -> PassConfig:
        """This config with the options the model decides fixed (adyt's `recipe=auto`), so
        what `surgeon.json` records replays the same rewrite on any copy of the model."""
        return self

    def after_commit(self, surgery: Surgery, new: list[str]) -> None:
        """Work that needs the rewritten model in place (calibration on the example)."""
        return None

    def preserves(self) -> float | None:
        """The largest change of the model's output this pass promises, relative to the
        output's largest magnitude (None: no promise; the pass changes what the model computes).
        `surgeon verify` fails a checkpoint whose pass moved the output more."""
        return None

    def selects(self, qualified_name: str) -> bool:
        """Whether the module `qualified_name` is in this pass's scope."""
        def hit(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(qualified_name, p) for p in patterns)

        return (not self.include or hit(self.include)) and not hit(self.exclude)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"_type": self.name, "_version": self.version, "_data": data}

    @classmethod
    def from_options(cls, options: dict[str, Any], where: str = "") -> PassConfig:
        """Build from user options (`key=value` strings or JSON values), checking each key and
        converting it to the field's type; errors name the pass and the option."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for key, raw in options.items():
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise PassError(f"{where or cls.name}: unknown option {key!r} (options: {known})")
            values[key] = _convert(raw, hints[key], f"{where or cls.name}: option {key!r}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise PassError(f"{where or cls.name}: {e}") from None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _convert(raw: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        if raw is None or (isinstance(raw, str) and raw.lower() == "none"):
            if type(None) in args:
                return None
        last: PassError | None = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(raw, arg, where)
            except PassError as e:
                last = e
        raise last or PassError(f"{where}: cannot read {raw!r}")
    if origin is tuple:
        items = raw.split("|") if isinstance(raw, str) else list(raw)
        return tuple(_convert(item, args[0] if args else str, where) for item in items if item)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no",
                                                    "off"):
            return raw.lower() in ("1", "true", "yes", "on")
        raise PassError(f"{where}: expected true or false, got {raw!r}")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise PassError(f"{where}: expected a{'n' if hint is int else ''} {hint.__name__}, "
                            f"got {raw!r}")
        try:
            value = hint(raw)
        except (TypeError, ValueError, OverflowError):
            raise PassError(f"{where}: expected a{'n' if hint is int else ''} "
                            f"{hint.__name__}, got {raw!r}") from None
        if hint is int and isinstance(raw, float) and raw != value:
            raise PassError(f"{where}: expected an int, got {raw!r}")
        return value
    if origin is typing.Literal:
        if raw not in args:
            raise PassError(f"{where}: expected one of {', '.join(map(str, args))}, got {raw!r}")
        return raw
    if hint is str:
        return str(raw)
    return raw


class PluginWarning(SurgeonWarning):
    """A pass plug-in (entry point of the `surgeon.passes` group) failed to load, or tried to
    take a name that is already registered; it was skipped."""


def register(cls: type[PassConfig], *, replace: bool = False) -> type[PassConfig]:
    """Class decorator: make a pass config findable by its `name`. A name that another class
    already holds (a built-in's, say) is refused unless `replace=True` is asked for on purpose;
    registering the same class again (a module reloaded) is fine."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    held = _REGISTRY.get(cls.name)
    if held is not None and not replace and _qualified(held) != _qualified(cls):
        raise PassError(f"pass name {cls.name!r} is taken by {_qualified(held)}; "
                        f"{_qualified(cls)} cannot replace it (give it another name, or "
                        "register(..., replace=True) to replace it on purpose)")
    _REGISTRY[cls.name] = cls
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_passes() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(_BUILTIN)
    builtin = dict(_REGISTRY)
    for ep in entry_points(group="surgeon.passes"):
        try:
            ep.load()
        except Exception as e:  # a broken plug-in must not take the other passes down
            message = " ".join(str(e).split()) or type(e).__name__
            warnings.warn(f"pass plug-in {ep.name!r} ({ep.value}) is skipped: it failed to "
                          f"load ({type(e).__name__}: {message})", PluginWarning, stacklevel=2)
        for name, cls in builtin.items():  # built-in names win, whatever the plug-in did
            if _REGISTRY.get(name) is not cls:
                warnings.warn(f"pass plug-in {ep.name!r} ({ep.value}) replaced the built-in "
                              f"pass {name!r}; the built-in is kept", PluginWarning,
                              stacklevel=2)
                _REGISTRY[name] = cls


def registered() -> dict[str, type[PassConfig]]:
    """Every known pass, by name."""
    _load_passes()
    return dict(_REGISTRY)


def pass_class(name: str) -> type[PassConfig]:
    passes = registered()
    if name not in passes:
        raise PassError(f"unknown pass {name!r}; known passes: {', '.join(sorted(passes))}")
    return passes[name]


def split_passes(spec: str) -> list[str]:
    """Passes joined by commas → one spec each: "aion,hyper:streams=4,mhc=true,adyt" →
    ["aion", "hyper:streams=4,mhc=true", "adyt"] (a `key=value` item after a pass is that
    pass's option)."""
    passes: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and passes:
            passes[-1] += "," + item
        else:
            passes.append(item)
    return passes


def parse_pass(spec: str | PassConfig | dict[str, Any]) -> PassConfig:
    """A config from a config, its JSON form, a name (`"aion"`) or `"name:key=value,..."`."""
    if isinstance(spec, PassConfig):
        check_options(spec)  # a plug-in's own __post_init__ may not call PassConfig's
        return spec
    if isinstance(spec, dict):
        return config_from_json(spec)
    if not isinstance(spec, str):
        raise PassError(f"a pass is a config or a name, not {type(spec).__name__}")
    name, _, rest = spec.partition(":")
    cls = pass_class(name.strip())
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise PassError(f"pass {spec!r}: option {item!r} is not key=value")
        options[key.strip()] = value.strip()
    return cls.from_options(options, where=f"pass {name.strip()!r}")


def config_from_json(data: dict[str, Any]) -> PassConfig:
    """The inverse of `PassConfig.to_json`; a newer `_version` than this surgeon knows fails."""
    try:
        name, version, options = data["_type"], data["_version"], data["_data"]
    except (KeyError, TypeError):
        raise PassError(f"not a pass config: {data!r}") from None
    cls = pass_class(name)
    if version > cls.version:
        raise PassError(f"pass {name!r} config version {version} is newer than this surgeon's "
                        f"({cls.version}); upgrade surgeon")
    return cls.from_options(options, where=f"pass {name!r}")
