"""A name -> class registry with the checks every extension point needs (explainers, metrics).

Parameter values are checked against the constructor's annotations (pipeline/params.py holds
the constrained types): `check_values` does it for a job spec on the driver, and every
registered class runs the same check on its own arguments when it is built, so a library user
gets the same message as `salient validate` and constructors carry no value checks.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import TypeAdapter, ValidationError


class Registry(dict):
    """`kind` names the extension point in errors; `skip` are constructor arguments that are
    not user parameters (self, the model)."""

    def __init__(self, kind: str, skip: tuple[str, ...] = ("self",)):
        super().__init__()
        self.kind, self.skip = kind, skip
        self._checks: dict[str, dict[str, tuple[Any, TypeAdapter]]] = {}

    def register(self, cls):
        """Register `cls` under `cls.name`; its constructor then checks its arguments' values and
        records them as the object's `params`."""
        if cls.name in self:
            raise ValueError(f"{self.kind} {cls.name!r} registered twice")
        cls.__init__ = self._checked_init(cls)
        self[cls.name] = cls
        return cls

    def lookup(self, name: str):
        if name not in self:
            close = difflib.get_close_matches(name, self, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self))})"
            )
        return self[name]

    def params(self, name: str) -> dict[str, inspect.Parameter]:
        """The keyword parameters a class accepts (to validate job specs before running)."""
        sig = inspect.signature(self.lookup(name).__init__)
        return {k: p for k, p in sig.parameters.items() if k not in self.skip}

    def annotations(self, name: str) -> dict[str, Any]:
        """Parameter -> its annotation, constraints included (`Annotated[int, Field(ge=1)]`)."""
        return {k: hint for k, (hint, _) in self._adapters(name).items()}

    def check_values(self, name: str, params: dict) -> None:
        """Each value against its constructor annotation, ranges and choices included. Strict:
        'abc' is no int, True is no int, 3 is a float. Parameters without an annotation (those
        a wrapper passes on through **kwargs) are left to the class that takes them."""
        checks = self._adapters(name)
        for key, value in params.items():
            if key not in checks:
                continue
            hint, adapter = checks[key]
            try:
                adapter.validate_python(value, strict=True)
            except ValidationError:
                raise ValueError(
                    f"{self.kind} {name!r}: {key} must be {describe(hint)}, got {value!r}"
                ) from None

    def check_params(self, name: str, params: dict) -> None:
        """Unknown parameter names, with what the class accepts (building it checks values)."""
        accepted = self.params(name)
        if any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            return  # a wrapper that passes the rest on to what it wraps
        unknown = [k for k in params if k not in accepted]
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"it accepts: {', '.join(accepted) or 'none'}"
            )

    def _adapters(self, name: str) -> dict[str, tuple[Any, TypeAdapter]]:
        if name not in self._checks:
            init = inspect.unwrap(self.lookup(name).__init__)
            hints = typing.get_type_hints(init, include_extras=True)
            self._checks[name] = {
                k: (hint, TypeAdapter(hint))
                for k, hint in hints.items()
                if k != "return" and k not in self.skip
            }
        return self._checks[name]

    def _checked_init(self, cls):
        init = cls.__init__  # the class's own or the one it inherits
        if getattr(init, "_checks_values", False):
            init = init.__wrapped__  # inherited from a registered class: check once, by this name
        sig = inspect.signature(init)
        plain = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)

        @functools.wraps(init)
        def checked(obj, *args, **kwargs):
            bound = sig.bind(obj, *args, **kwargs)
            given = {
                k: v for k, v in bound.arguments.items() if sig.parameters[k].kind not in plain
            }
            self.check_values(cls.name, given)
            if "params" not in vars(obj):  # the outermost constructor: what the user passed
                obj.params = self._user_params(sig, bound)
            init(obj, *args, **kwargs)

        checked._checks_values = True
        return checked

    def _user_params(self, sig: inspect.Signature, bound: inspect.BoundArguments) -> dict:
        """The parameters a user gave (not the object or the model), those passed on through
        **kwargs included: enough to build the same thing again on another model."""
        params = {}
        for k, v in bound.arguments.items():
            kind = sig.parameters[k].kind
            if kind == inspect.Parameter.VAR_KEYWORD:
                params.update(v)
            elif k not in self.skip and kind != inspect.Parameter.VAR_POSITIONAL:
                params[k] = v
        return params


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_NAMES |= {dict: "a mapping", type(None): "null"}


def describe(annotation) -> str:
    """An annotation in words for error messages: `Annotated[int, Field(ge=1)] | None` ->
    "an integer >= 1 or null"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        base, *meta = args
        c = _constraints(meta)
        finite = base is float and c.get("allow_inf_nan") is False
        return " ".join(["a finite number" if finite else describe(base), *_bounds(c)])
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        parts = list(dict.fromkeys(describe(a) for a in args))  # list and tuple read alike
        return " or ".join(parts)
    if origin in (list, tuple):
        return f"a list, each item {describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return _NAMES.get(annotation) or getattr(annotation, "__name__", str(annotation))


def _constraints(meta) -> dict[str, Any]:
    """The bounds and flags in Annotated metadata (pydantic FieldInfo or annotated_types)."""
    out = {}
    for m in meta:
        for c in getattr(m, "metadata", [m]):
            for key in ("ge", "gt", "le", "lt", "allow_inf_nan"):
                if hasattr(c, key):
                    out[key] = getattr(c, key)
    return out


def _bounds(c: dict[str, Any]) -> list[str]:
    lo = ("[", c["ge"]) if "ge" in c else ("(", c["gt"]) if "gt" in c else None
    hi = ("]", c["le"]) if "le" in c else (")", c["lt"]) if "lt" in c else None
    if lo and hi:
        return [f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"]
    if lo:
        return [f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"]
    if hi:
        return [f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"]
    return []
