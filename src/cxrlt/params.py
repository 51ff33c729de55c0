"""params.yaml access for the stage scripts."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from cxrlt.errors import DataError


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: params file not found (run from the repository root)")
    with open(path) as f:
        try:
            params = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(params, Mapping):
        raise DataError(f"{path}: expected a mapping at the top level")
    return Params(params)


class MissingParamError(DataError, KeyError):
    """A key a stage reads is absent from params.yaml. A KeyError too, so code that falls
    back on KeyError keeps working; a DataError, so the stage prints one line naming it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Params(dict):
    """params.yaml as the stages read it: `params["train"]["crt"]["lr"]` on a file without
    that key fails with one line naming `train.crt.lr` instead of a bare KeyError traceback.

    Nested sections are Params too, converted once here, so `params["train"]` is the stored
    section itself (a change made through it stays). Checkpoints store plain dicts
    (`cxrlt.checkpoint._plain`), so no Params object reaches a checkpoint.
    """

    def __init__(self, data: Mapping[str, Any] = (), path: str = ""):
        super().__init__(data)
        self._path = path
        for key, value in dict.items(self):
            if isinstance(value, Mapping) and not isinstance(value, Params):
                dict.__setitem__(self, key, Params(value, self._where(key)))

    def _where(self, key: object) -> str:
        return f"{self._path}.{key}" if self._path else str(key)

    def __getitem__(self, key: str) -> Any:
        try:
            return super().__getitem__(key)
        except KeyError:
            raise MissingParamError(f"params.yaml: missing key {self._where(key)!r}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 (dict.get skips __getitem__)


def section(params: Mapping[str, Any], key: str) -> Any:
    """params[key] with an error that names the missing key."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise DataError(f"params.yaml: missing key {key!r}")
        node = node[part]
    return node


def check_keys(settings: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """One line naming a params section's unknown keys and the valid ones (a typo in a
    knob would otherwise be ignored silently)."""
    valid = sorted(valid)
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise DataError(f"params {where}: unknown keys {unknown}; valid: {valid}")


def settings_section(params: Mapping[str, Any], name: str, valid: Iterable[str]) -> Mapping[str, Any]:
    """params[name], which must be a mapping holding only `valid` keys."""
    found = params.get(name)
    if not isinstance(found, Mapping):
        raise DataError(f"params.yaml: no `{name}` section (see the repository's params.yaml)")
    check_keys(found, valid, name)
    return found


# `yaml.safe_dump(load_params())` (tests, scripts writing a changed params.yaml) sees a dict.
yaml.SafeDumper.add_representer(Params, lambda dumper, data: dumper.represent_dict(dict(data)))
