"""Configuration objects at the user's boundary: frozen, validated, loaded from YAML or JSON, with a JSON Schema.

Every config a user writes (the EP group's `GroupConfig`, the server's, the training job's) subclasses
`Config`: a pydantic model that is frozen, strict (no "7" for 7, no 1.5 for an int) and refuses unknown
fields. Errors name the field by its dotted path and say what was expected:

    ConfigError: engine.yaml: exchange: expected 'auto', 'all_to_all' or 'symm_mem', got 'nccl'
                 engine.yaml: timeouts.step_s: expected a number > 0, got -1

`Config.json_schema()` is what the Helm chart's `values.schema.json` and editors validate against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["Config", "ConfigError", "read_file"]


class ConfigError(ValueError):
    """A config that cannot be used; one line per problem, each naming the field."""


def read_file(path: str | Path) -> Any:
    """The parsed YAML (or JSON) of a config file ({} when empty), before validation; ConfigError when it
    cannot be read or parsed (callers that merge command-line flags into a file start here)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return {} if data is None else data


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"{where}: unknown field"
    if kind == "missing":
        return f"{where}: required field missing"
    if kind == "value_error":  # our own validators write the whole sentence, field first
        text = msg.removeprefix("Value error, ")
        return text if not error["loc"] else f"{where}: {text}"
    expected = msg.removeprefix("Input should be ")
    expected = {"a valid integer": "an integer", "a valid number": "a number", "a valid boolean": "true or false",
                "a valid string": "a string"}.get(expected, expected)
    if expected.startswith(("greater", "less")):
        expected = f"a value {expected}"
    return f"{where}: expected {expected}, got {error.get('input')!r}"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> Self:
        """Validate a mapping (e.g. parsed YAML); `source` prefixes the error lines."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError("\n".join(f"{source}: {_describe(e)}" for e in exc.errors())) from None

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a YAML (or JSON, a subset of YAML) file."""
        return cls.from_dict(read_file(path), str(path))

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def dump(self, path: str | Path) -> None:
        """Write YAML (JSON when the path ends in .json) that `load` reads back to an equal config."""
        path = Path(path)
        text = (json.dumps(self.to_dict(), indent=2) + "\n" if path.suffix == ".json"
                else yaml.safe_dump(self.to_dict(), sort_keys=False))
        path.write_text(text)

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied, validated like a loaded file (dotted names not supported)."""
        return type(self).from_dict({**self.to_dict(), **changes}, type(self).__name__)

    @classmethod
    def json_schema(cls) -> dict:
        """JSON Schema (draft 2020-12) of the config file."""
        return cls.model_json_schema()
