"""One knob table: RunSettings declares each run setting once, and the CLI's options and
the DAG's params are built from it, with the same defaults, types and bounds."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

import pytest

from maga_tasks.cli import build_parser
from maga_tasks.knobs import add_run_setting, cli_settings, knob, param_kwargs, param_settings, value_type
from maga_tasks.settings import RunSettings

FIELDS = RunSettings.model_fields
# Subcommands whose options configure something else than a run: benchmarks pick their
# own concurrency per experiment, the test server is a fake LLM.
NOT_RUN_COMMANDS = {"bench", "test-llm-server"}
# DAG params named like a run setting that are not the setting itself.
NOT_FROM_THE_TABLE = {
    "endpoints": "a run's choice among the endpoints the operator configured (run_conf.choose_endpoints); "
                 "empty means all of them, where RunSettings needs at least one URL",
}
BOUND_KEYS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


def commands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(command name, its parser) for every subcommand, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from commands(sub, f"{prefix}{name} ")


def run_commands():
    return [(name, sub) for name, sub in commands(build_parser()) if name.split()[0] not in NOT_RUN_COMMANDS]


def stray_options(parser: argparse.ArgumentParser) -> list[str]:
    """Options of `parser` that stand for a run setting (by dest or by the table's flag)
    without being built from the table."""
    flags = {knob(name).cli: name for name in cli_settings()}
    stray = []
    for action in parser._actions:
        stands_for = action.dest if action.dest in FIELDS else None
        stands_for = stands_for or next((flags[o] for o in action.option_strings if o in flags), None)
        if stands_for and (getattr(action, "run_setting", None) != stands_for or action.dest != stands_for):
            stray.append("/".join(action.option_strings) or action.dest)
    return stray


def test_no_cli_option_stands_for_a_run_setting_outside_the_table():
    found = {name: stray_options(sub) for name, sub in run_commands()}
    assert {name: options for name, options in found.items() if options} == {}


def test_a_stray_option_is_found():
    """The check above must be able to fail: a hand-written --concurrency is caught, by
    its flag or by its dest."""
    parser = argparse.ArgumentParser()
    add_run_setting(parser, "request_timeout_s")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--progress", dest="progress_interval_s", type=float, default=10.0)
    assert stray_options(parser) == ["--concurrency", "--progress"]


def test_cli_options_have_the_settings_defaults_and_types():
    seen = set()
    for command, sub in run_commands():
        for action in sub._actions:
            if getattr(action, "run_setting", None) is None:
                continue
            name = action.run_setting
            field, (scalar, _, sequence) = FIELDS[name], value_type(FIELDS[name])
            seen.add(name)
            assert action.option_strings == [knob(name).cli], (command, name)
            assert action.required == field.is_required(), (command, name)
            if scalar is bool:  # a flag that turns the default over
                assert action.default is field.default and action.const is (not field.default), (command, name)
            else:
                assert action.type is scalar, (command, name)
                assert action.default == (None if field.is_required() else field.default), (command, name)
                assert isinstance(action, argparse._AppendAction) == sequence, (command, name)
    assert seen == set(cli_settings())  # every option the table declares is offered somewhere


def dag_module(monkeypatch):
    from tests.support.airflow import DAGS_FOLDER

    for variable in ("MAGA_SERVED_MODEL", "MAGA_LEASE_TTL_SECONDS"):
        monkeypatch.delenv(variable, raising=False)
    spec = importlib.util.spec_from_file_location("maga_dag_for_knobs", DAGS_FOLDER / "maga_corpus_expansion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pydantic_schema(name: str) -> dict:
    """The field's type and bounds as pydantic itself states them (not through knobs)."""
    schema = RunSettings.model_json_schema()["properties"][name]
    types = [item["type"] for item in schema.get("anyOf", [schema])]
    bounds = {key: value for item in schema.get("anyOf", [schema]) for key, value in item.items() if key in BOUND_KEYS}
    return {"type": types[0] if len(types) == 1 else sorted(types), **bounds}


@pytest.mark.airflow
def test_dag_params_have_the_settings_defaults_types_and_bounds(monkeypatch):
    params = dag_module(monkeypatch).PARAMS
    assert set(param_settings()) <= set(params)
    for name, param in params.items():
        if name not in FIELDS or name in NOT_FROM_THE_TABLE:
            continue
        assert name in param_settings(), f"DAG param {name} is a run setting but not from the table"
        assert param.value == FIELDS[name].default, name
        kind = param.schema["type"]
        schema = {"type": sorted(kind) if isinstance(kind, list) else kind,
                  **{key: value for key, value in param.schema.items() if key in BOUND_KEYS}}
        assert schema == pydantic_schema(name), name
        assert set(param.schema) <= {"type", *BOUND_KEYS}, name  # nothing hand-added beside the table
        assert param.description and param.description.lower() == FIELDS[name].description.lower(), name


@pytest.mark.airflow
def test_dag_params_refuse_what_run_settings_refuse(monkeypatch):
    from airflow.sdk.exceptions import ParamValidationError
    from pydantic import ValidationError

    params = dag_module(monkeypatch).PARAMS
    for name, value in (("max_concurrency", 0), ("max_concurrency", 4097), ("progress_interval_s", 0),
                        ("data_docs_sample_rate", 1.5), ("max_shard_failures", 0)):
        with pytest.raises(ParamValidationError):
            params[name].resolve(value)
        with pytest.raises(ValidationError):
            RunSettings(endpoints=("http://w1:8000",), **{name: value})


@pytest.mark.airflow
def test_the_dag_hands_every_param_setting_to_run_settings(monkeypatch):
    module = dag_module(monkeypatch)
    monkeypatch.setenv("MAGA_API_KEY", "k")  # no connection lookup outside a task
    changed = {"served_model": "alias", "max_concurrency": 7, "adaptive_concurrency": False,
               "progress_interval_s": 2.5, "max_shard_failures": 9, "data_docs_sample_rate": 0.5, "server_slots": 32}
    assert set(changed) == set(param_settings())
    params = {name: param.value for name, param in module.PARAMS.items()} | {"endpoints": ["http://w1:8000"]}
    settings = module._run_settings(params | changed)
    assert {name: getattr(settings, name) for name in changed} == changed


@pytest.mark.airflow
def test_the_three_agree_on_the_defaults_chosen(monkeypatch):
    """Where they differed before (max_concurrency 64/128, progress interval 10/30), one
    default now, the same in RunSettings, `maga publish-shard` and the DAG."""
    publish = dict(commands(build_parser()))["publish-shard"]
    cli_defaults = {a.dest: a.default for a in publish._actions if getattr(a, "run_setting", None)}
    dag_params = dag_module(monkeypatch).PARAMS
    for name in param_settings():
        assert FIELDS[name].default == cli_defaults[name] == dag_params[name].value, name
    assert FIELDS["max_concurrency"].default == 128 and FIELDS["progress_interval_s"].default == 30
    assert dag_module(monkeypatch).LEASE_TTL_SECONDS == FIELDS["lease_ttl_s"].default


def test_a_deployment_default_comes_from_its_variable():
    assert param_kwargs({"MAGA_SERVED_MODEL": "alias"})["served_model"]["default"] == "alias"
    assert param_kwargs({})["served_model"]["default"] is None


def test_an_out_of_bounds_option_is_bad_input(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "expand-shard", str(tmp_path / "s.parquet"), "--output-root",
         str(tmp_path / "out"), "--endpoint", "http://127.0.0.1:9", "--concurrency", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "max_concurrency" in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr
