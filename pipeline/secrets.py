"""What counts as a secret, in one place: environment variables with secret-looking names.

Secrets never travel in a spec, a submission, MLflow or an output folder: a text holding one's
value is refused (`find_secret`), and values that would be recorded are redacted (`redact`).
Kept free of heavy imports so that the CLI and the submit path can use it cheaply.
"""

from __future__ import annotations

import os
import re

SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|session_key)", re.I)


def secret_values() -> dict[str, str]:
    """env name -> value, for every secret-looking variable with a value worth matching."""
    return {k: v for k, v in os.environ.items() if SECRET_KEY.search(k) and len(v) >= 4}


def find_secret(text: str) -> str | None:
    """The name of an environment secret whose value occurs in `text`, else None."""
    return next((k for k, v in secret_values().items() if v in text), None)


def redact(value):
    """A copy with every secret value replaced by *** and every secret-named key's value
    hidden; walks dicts and lists (a spec, a set of tags)."""
    secrets = list(secret_values().values())

    def walk(v, key: str = ""):
        if key and SECRET_KEY.search(key) and not isinstance(v, dict | list):
            return "***"
        if isinstance(v, dict):
            return {k: walk(x, str(k)) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str):
            for s in secrets:
                v = v.replace(s, "***")
        return v

    return walk(value)
