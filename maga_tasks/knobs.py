"""The run settings table (`settings.RunSettings`) as `maga` options and DAG params.

A field marked `Knob(cli=...)` becomes an argparse option with the field's name as its
dest, its type and default (bounds are RunSettings' own: a value out of them is an
"invalid settings" error, exit 2). A field marked `Knob(param=True)` becomes the keyword
arguments of an Airflow `Param` of the same name: default, JSON-schema type and bounds,
description. Nothing here imports Airflow, and nothing heavy: the DAG file calls
`param_kwargs()` while it is parsed.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic.fields import FieldInfo

from maga_tasks.settings import Knob, RunSettings

_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
_JSON_BOUNDS = {
    Ge: ("minimum", "ge"),
    Gt: ("exclusiveMinimum", "gt"),
    Le: ("maximum", "le"),
    Lt: ("exclusiveMaximum", "lt"),
}


def knob(name: str) -> Knob | None:
    return next((item for item in RunSettings.model_fields[name].metadata if isinstance(item, Knob)), None)


def cli_settings() -> list[str]:
    """The run settings that are `maga` options, in the table's order."""
    return [name for name in RunSettings.model_fields if (k := knob(name)) and k.cli]


def param_settings() -> list[str]:
    """The run settings that are params of the nightly DAG, in the table's order."""
    return [name for name in RunSettings.model_fields if (k := knob(name)) and k.param]


def value_type(field: FieldInfo) -> tuple[type, bool, bool]:
    """(the scalar type, whether None is allowed, whether it is a sequence of them)."""
    annotation, optional = field.annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, optional = members[0], len(members) < len(typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def bounds(field: FieldInfo) -> dict[str, Any]:
    """The field's numeric bounds as JSON-schema keywords (`minimum`, `exclusiveMaximum`...)."""
    found = {}
    for item in field.metadata:
        for kind, (keyword, attribute) in _JSON_BOUNDS.items():
            if isinstance(item, kind):
                found[keyword] = getattr(item, attribute)
    return found


def _default(field: FieldInfo) -> Any:
    return None if field.is_required() else field.default


def argparse_kwargs(name: str) -> tuple[str, dict[str, Any]]:
    """(option string, `add_argument` keyword arguments) of a run setting's `maga` option."""
    field, option = RunSettings.model_fields[name], knob(name).cli
    scalar, _, sequence = value_type(field)
    default = _default(field)
    kwargs: dict[str, Any] = {"dest": name, "help": field.description}
    if scalar is not bool:
        kwargs["metavar"] = option.lstrip("-").replace("-", "_").upper()  # --request-timeout REQUEST_TIMEOUT
    if scalar is bool:
        # The flag turns the default over: --fixed-concurrency sets adaptive_concurrency off.
        kwargs.update(action="store_false" if default else "store_true", default=default,
                      help=f"{name} {'off' if default else 'on'} (default {'on' if default else 'off'}): "
                           f"{field.description}")
    elif sequence:
        kwargs.update(action="append", type=scalar, required=field.is_required(), default=None)
    else:
        kwargs.update(type=scalar, default=default)
        if default is not None:
            kwargs["help"] += f" (default {default})"
    return option, kwargs


def add_run_setting(parser: argparse.ArgumentParser, name: str) -> argparse.Action:
    """Add a run setting's option to `parser`, marked as one (tests/unit/test_knobs.py checks
    that no option stands for a run setting without coming from here)."""
    option, kwargs = argparse_kwargs(name)
    action = parser.add_argument(option, **kwargs)
    action.run_setting = name
    return action


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings a parsed command line gives (those its command has options for)."""
    values = {name: getattr(args, name) for name in cli_settings() if hasattr(args, name)}
    if values.get("endpoints") is not None:
        values["endpoints"] = tuple(values["endpoints"])
    return {name: value for name, value in values.items() if value is not None}


def param_kwargs(environ: typing.Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """`Param(**kwargs)` keyword arguments of each run setting that is a DAG param: the
    field's default (or its `env` variable's value in `environ`), JSON-schema type and
    bounds, and description."""
    environ = os.environ if environ is None else environ
    params = {}
    for name in param_settings():
        field = RunSettings.model_fields[name]
        scalar, optional, sequence = value_type(field)
        json_type = _JSON_TYPES[scalar]
        kwargs: dict[str, Any] = {"type": ["null", json_type] if optional else json_type, **bounds(field)}
        if sequence:
            kwargs = {"type": "array", "items": kwargs}
        default = _default(field)
        if (variable := knob(name).env) and environ.get(variable):
            default = scalar(environ[variable])
        params[name] = {"default": list(default) if sequence and default else default, **kwargs,
                        "description": field.description[:1].upper() + field.description[1:]}
    return params


def settings_from_params(params: typing.Mapping[str, Any]) -> dict[str, Any]:
    """The run settings a DAG run's params give (every param that is a run setting)."""
    return {name: params[name] for name in param_settings()}
