"""A name -> class registry with the checks every extension point needs (explainers, metrics)."""

from __future__ import annotations

import difflib
import inspect


class Registry(dict):
    """`kind` names the extension point in errors; `skip` are constructor arguments that are
    not user parameters (self, the model)."""

    def __init__(self, kind: str, skip: tuple[str, ...] = ("self",)):
        super().__init__()
        self.kind, self.skip = kind, skip

    def register(self, cls):
        if cls.name in self:
            raise ValueError(f"{self.kind} {cls.name!r} registered twice")
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

    def check_types(self, name: str, params: dict) -> None:
        """Each value against its constructor annotation (strict: 'abc' is no int, True is no
        int, 3 is a float), so a text where a number belongs is refused before anything runs."""
        import typing

        from pydantic import TypeAdapter, ValidationError

        hints = typing.get_type_hints(self.lookup(name).__init__)
        for key, value in params.items():
            if key not in hints:
                continue
            try:
                TypeAdapter(hints[key]).validate_python(value, strict=True)
            except ValidationError:
                expected = getattr(hints[key], "__name__", None) or str(hints[key])
                raise ValueError(
                    f"{self.kind} {name!r}: {key} must be {expected}, got {value!r}"
                ) from None

    def check_params(self, name: str, params: dict) -> None:
        accepted = self.params(name)
        if any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            return  # a wrapper that passes the rest on to what it wraps
        unknown = [k for k in params if k not in accepted]
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"it accepts: {', '.join(accepted) or 'none'}"
            )
        self.check_types(name, params)
