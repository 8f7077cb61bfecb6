"""Reading and validating the OpenLineage events a run wrote through the provider's file
transport.

The installed `openlineage-python` client ships no JSON schema of the OpenLineage spec
(no OpenLineage.json in its wheel: it ships the attrs classes generated from it), so an
event is validated against what is installed:
- the event itself and its datasets by the client's attrs classes (`RunEvent`, `Run`,
  `Job`, `InputDataset`, `OutputDataset`): rebuilt from the JSON, their validators
  run (run id a UUID, event time with a time), and serialized back it must be the JSON;
- each facet by the schema its `_schemaURL` names: the JSON schemas the Airflow provider
  ships for its facets (`airflow/providers/openlineage/facets/*.json`), ours
  (`maga_tasks/lineage_facets.schema.json`), or else the client's generated facet class
  of that URL, built from the facet's fields (unknown or missing fields fail). The
  spec's `BaseFacet`, which the provider's schemas refer to, stands in as the client's
  `BaseFacet` fields: `_producer` and `_schemaURL`, both required strings. The
  provider's departures from its own schemas are allowed by name (`PROVIDER_DEPARTURES`).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from functools import cache
from pathlib import Path

import attr

OPENLINEAGE_SPEC = "https://openlineage.io/spec/2-0-2/OpenLineage.json"
OUR_SCHEMA = Path(__file__).resolve().parents[2] / "maga_tasks" / "lineage_facets.schema.json"


def read_events(path: Path) -> list[dict]:
    """The events of a file transport's file (`append`: one JSON event a line)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@cache
def _client_facet_classes() -> dict[str, type]:
    """The client's generated facet classes by the schema URL they declare."""
    import openlineage.client.generated as generated

    classes = {}
    for module_info in pkgutil.iter_modules(generated.__path__):
        module = importlib.import_module(f"{generated.__name__}.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and attr.has(value) and value.__module__ == module.__name__:
                schema = getattr(value, "_get_schema", None)
                if schema is not None:
                    classes[schema()] = value
    return classes


@cache
def _provider_facet_schemas() -> dict[str, dict]:
    """The provider's facet schemas, by file name."""
    import airflow.providers.openlineage.facets as facets

    folder = Path(facets.__file__).parent
    return {path.name: json.loads(path.read_text()) for path in folder.glob("*.json")}


# Where the provider (2.20.3) departs from its own schemas on Airflow 3.3, as (instance
# path, error): the task instance its `airflow` facet describes is the Task SDK's, which
# has no `pool`; `retry_exponential_backoff` became a multiplier (our 2.0) where the
# schema still has a boolean. Any other error fails.
PROVIDER_DEPARTURES = {
    ("$.taskInstance", "'pool' is a required property"),
    ("$.task.retry_exponential_backoff", "is not of type 'boolean'"),
}


def _registry():
    """A jsonschema resource registry in which the spec's `BaseFacet`/`RunFacet`/`JobFacet`
    are the client's base facet fields (see the module docstring)."""
    from referencing import Registry, Resource

    base = {
        "type": "object",
        "properties": {"_producer": {"type": "string"}, "_schemaURL": {"type": "string"}},
        "required": ["_producer", "_schemaURL"],
    }
    spec = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": {name: base for name in ("BaseFacet", "RunFacet", "JobFacet", "DatasetFacet")},
    }
    return Registry().with_resource(OPENLINEAGE_SPEC, Resource.from_contents(spec))


def _validate_with_schema(document: dict, definition: str, facet: dict, allowed=frozenset()) -> None:
    import jsonschema

    schema = {**document, "$ref": f"#/$defs/{definition}"}
    errors = jsonschema.Draft202012Validator(schema, registry=_registry()).iter_errors(facet)
    unexpected = [e for e in errors if not any(e.json_path == p and m in e.message for p, m in allowed)]
    assert not unexpected, [f"{definition} {e.json_path}: {e.message}" for e in unexpected]


# The provider's facets name the spec's generic RunFacet/JobFacet as their `_schemaURL`;
# they are told apart by name: the JSON schema the provider ships for it, else its class.
_PROVIDER_FACETS = {
    ("run", "airflow"): "AirflowRunFacet.json",
    ("run", "airflowDagRun"): "AirflowDagRunFacet.json",
    ("run", "airflowState"): "AirflowStateRunFacet.json",
    ("run", "debug"): "AirflowDebugRunFacet.json",
    ("job", "airflow"): "AirflowJobFacet.json",
    ("run", "airflow_mappedTask"): "AirflowMappedTaskRunFacet",
    ("run", "unknownSourceAttribute"): "UnknownOperatorAttributeRunFacet",
}


def validate_facet(where: str, name: str, facet: dict) -> str:
    """Validate facet `name` of the `where` ("run", "job", "dataset") against the schema
    its `_schemaURL` (or for the provider's, its name) points at; returns which kind of
    schema it was (`provider`, `ours`, `client`)."""
    url = facet.get("_schemaURL")
    assert isinstance(url, str) and isinstance(facet.get("_producer"), str), (name, facet)
    location, _, pointer = url.partition("#/$defs/")
    if location.startswith("urn:maga-tasks:"):
        _validate_with_schema(json.loads(OUR_SCHEMA.read_text()), pointer, facet)
        return "ours"
    provider = _PROVIDER_FACETS.get((where, name)) if location == OPENLINEAGE_SPEC else None
    if provider in _provider_facet_schemas():
        document = _provider_facet_schemas()[provider]
        _validate_with_schema(document, provider.removesuffix(".json"), facet, PROVIDER_DEPARTURES)
        return "provider"
    if provider is not None:
        import airflow.providers.openlineage.plugins.facets as facets

        _build(getattr(facets, provider), facet)
        return "provider"
    cls = _client_facet_classes().get(url)
    assert cls is not None, f"{where} facet {name}: no schema installed for {url}"
    assert _build(cls, facet)._get_schema() == url
    return "client"


def _build(cls: type, facet: dict):
    """An attrs facet class built from a facet's fields: an unknown or missing field raises."""
    return cls(**{key.lstrip("_"): value for key, value in facet.items() if key != "_schemaURL"})


def validate_event(event: dict) -> list[str]:
    """Validate a run event (see the module docstring); returns the kinds of schema its
    facets were checked against, one per facet."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.serde import Serde

    rebuilt = RunEvent(
        eventType=RunState(event["eventType"]),
        eventTime=event["eventTime"],
        run=Run(runId=event["run"]["runId"]),
        job=Job(namespace=event["job"]["namespace"], name=event["job"]["name"]),
        inputs=[InputDataset(namespace=d["namespace"], name=d["name"]) for d in event.get("inputs", [])],
        outputs=[OutputDataset(namespace=d["namespace"], name=d["name"]) for d in event.get("outputs", [])],
        producer=event["producer"],
    )
    assert event["schemaURL"] == rebuilt.schemaURL, event["schemaURL"]
    assert _without_facets(Serde.to_dict(rebuilt)) == _without_facets(event)
    kinds = []
    owners = [("run", event["run"]), ("job", event["job"])]
    owners += [("dataset", d) for d in (*event.get("inputs", []), *event.get("outputs", []))]
    for where, owner in owners:
        for key in ("facets", "inputFacets", "outputFacets"):
            for name, facet in (owner.get(key) or {}).items():
                kinds.append(validate_facet(where, name, facet))
    return kinds


def _without_facets(value):
    if isinstance(value, dict):
        return {k: _without_facets(v) for k, v in value.items() if k not in ("facets", "inputFacets", "outputFacets")}
    if isinstance(value, list):
        return [_without_facets(v) for v in value]
    return value
