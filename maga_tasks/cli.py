"""The `maga` command line: the library's operations without Airflow.

Progress goes to stderr; a command's result is JSON on the last line of stdout. Errors
end with a one-line message and a non-zero exit code, never a traceback; the code is the
one the error's class carries (`exit_code`, maga_tasks/errors.py):
1 the pipeline refused: a shard failed its gate or was quarantined, or is failed for good,
2 bad input (recipe, shard, arguments, settings, a storage root, a missing registry file),
3 the LLM endpoints, the storage or the registry are unreachable (a passing fault: retry),
  or the LLM fleet refuses the run (key, model, context length: fix the configuration),
4 the shard is another worker's: its lease is held (retry once it runs out), was taken
  over while this one ran, or it is registered with other content.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pydantic import ValidationError

from maga_tasks.errors import EXIT_BAD_INPUT, MagaError
from maga_tasks.redaction import clean_text, install_log_redaction, strip_control


def _settings(args, **extra):
    from maga_tasks.knobs import settings_from_args
    from maga_tasks.settings import RunSettings

    return RunSettings(**settings_from_args(args), **extra)


# The run settings every command that talks to the LLM fleet takes (maga_tasks.settings
# declares each once: option, type, default, help).
_RUN_OPTIONS = (
    "endpoints", "served_model", "max_concurrency", "adaptive_concurrency", "request_timeout_s", "s3_endpoint_url",
    "progress_interval_s", "all_down_timeout_s", "server_slots",
)


def _add_run_options(parser: argparse.ArgumentParser, *more: str) -> None:
    parser.add_argument("--recipe", help="recipe YAML (default: the built-in recipe)")
    _add_settings(parser, *_RUN_OPTIONS, *more)
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--id-column", default="id")


def _add_settings(parser: argparse.ArgumentParser, *names: str) -> None:
    from maga_tasks.knobs import add_run_setting

    for name in names:
        add_run_setting(parser, name)


def cmd_expand_shard(args) -> dict:
    from maga_tasks.engine.shard import expand_shard
    from maga_tasks.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    result = expand_shard(
        args.source,
        args.output_root,
        recipe,
        _settings(args),
        max_docs=args.max_docs,
        columns=_columns(args),
    )
    return result.to_dict()


def _columns(args):
    from maga_tasks.data.source import SourceColumns

    return SourceColumns(id=args.id_column, text=args.text_column)


def cmd_sample_corpus(args) -> dict:
    from maga_tasks.data.sample_corpus import write_sample_corpus

    partitions = args.partitions.split(",") if args.partitions else None
    paths = write_sample_corpus(args.out, args.shards, args.docs_per_shard, fmt=args.format, partitions=partitions)
    return {"shards": [str(p) for p in paths], "documents": len(paths) * args.docs_per_shard}


def cmd_test_llm_server(args) -> dict:
    from maga_tasks.tools.test_server import parse_fault, run_server

    faults = [parse_fault(spec) for spec in args.fault]
    run_server(
        args.host,
        args.port,
        faults=faults,
        latency_ms=args.latency_ms,
        model=args.model,
        api_key=args.api_key,
        structured_outputs=not args.no_structured_outputs,
    )
    return {"stopped": True}


def cmd_recipe(args) -> dict:
    from maga_tasks.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.show:
        sys.stderr.write(recipe.to_yaml())
    return {
        "recipe_id": recipe.recipe_id,
        "name": recipe.name,
        "model": recipe.model,
        "prompt_version": recipe.prompt_version,
    }


def _registry(args, *, create: bool = True):
    """The registry; `create=False` for commands that read (or change) an existing one:
    a mistyped SQLite path is one line, and no empty database is left behind."""
    from maga_tasks.registry import Registry

    return Registry(args.registry, create=create)


def cmd_db_upgrade(args) -> dict:
    registry = _registry(args)
    applied = registry.upgrade()
    return {"applied": applied, "schema_version": registry.schema_version()}


def _shard_args(args):
    from maga_tasks.recipe import load_recipe

    return load_recipe(args.recipe), args.source, args.output_root


def cmd_validate_shard(args) -> dict:
    from maga_tasks.engine.job import ShardJob
    from maga_tasks.engine.publish import check_committed_shard

    recipe, source, root = _shard_args(args)
    registry = _registry(args, create=False) if args.registry else None
    # Someone asked for this shard: its Data Docs are rendered whatever the sample.
    if args.input:
        job = ShardJob.of(
            source, root, recipe, shard=args.shard, s3_endpoint_url=args.s3_endpoint_url, data_docs_sample_rate=1.0
        )
        report = job.input_gate()
    else:
        report = check_committed_shard(
            source, root, recipe, shard=args.shard, registry=registry, s3_endpoint_url=args.s3_endpoint_url,
            data_docs_sample_rate=1.0,
        )
    summary = {"shard": report.shard, "gate": report.gate, "success": report.success,
               "failed_expectations": report.failed_names, "data_docs": report.data_docs_uri,
               "result": report.result_uri}
    if not report.success:
        print(f"maga: shard failed its quality gate: {report.reason()}", file=sys.stderr)
        args.exit_code = 1
    return summary


def cmd_register_shard(args) -> dict:
    from maga_tasks.engine.publish import register_committed_shard

    recipe, source, root = _shard_args(args)
    registry = _registry(args)
    registry.upgrade()
    summary = register_committed_shard(
        source, root, recipe, registry, shard=args.shard, s3_endpoint_url=args.s3_endpoint_url
    )
    if summary["status"] != "registered":
        print(f"maga: shard quarantined: {summary.get('reason')}", file=sys.stderr)
        args.exit_code = 1
    return summary


def cmd_publish_shard(args) -> dict:
    from maga_tasks.engine.publish import default_owner, publish_shard
    from maga_tasks.recipe import load_recipe

    registry = _registry(args)
    registry.upgrade()
    return publish_shard(
        args.source, args.output_root, load_recipe(args.recipe), _settings(args), registry,
        owner=default_owner(), max_docs=args.max_docs, columns=_columns(args), judge_sample=args.judge_sample,
    )


def cmd_judge_shard(args) -> dict:
    from maga_tasks.engine.publish import record_judge
    from maga_tasks.method.judging import judge_committed_shard
    from maga_tasks.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    report = judge_committed_shard(
        args.source, args.output_root, recipe, _settings(args), sample=args.sample, shard=args.shard,
        columns=_columns(args),
    )
    if args.registry:
        registry = _registry(args)
        registry.upgrade()
        registry.ensure_recipe(recipe)
        record_judge(registry, report)
    return {"shard": report.shard, "recipe_id": report.recipe_id, **report.statistics(), "judge_uri": report.uri}


def cmd_status(args) -> dict:
    from maga_tasks.registry.reads import format_status

    status = _registry(args, create=False).status(args.recipe_id, limit=args.limit)
    if not args.json:
        sys.stderr.write(format_status(status) + "\n")
    return status


def cmd_plan(args) -> dict:
    from maga_tasks.engine.budget import DEFAULT_RUN_HOURS, night_budget
    from maga_tasks.engine.planning import plan_run
    from maga_tasks.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    registry = _registry(args, create=False)
    if registry.schema_version() == 0:
        raise ValueError(f"registry {args.registry} has no schema yet: run `maga db upgrade` first")
    budget, night = args.budget, None
    if budget is not None and args.planning_mode == "flat":
        # What the DAG's plan_shards does with `shards_per_run`: 0 derives it from the fleet.
        night = night_budget(
            budget, registry, recipe.recipe_id, slots=args.pool_slots,
            run_hours=DEFAULT_RUN_HOURS if args.run_hours is None else args.run_hours, shard_hours=args.shard_hours,
        )
        budget = night.shards
    plan = plan_run(
        args.source, recipe.recipe_id, registry, mode=args.planning_mode, ds=args.ds, budget=budget,
        max_shards=args.max_shards, max_failures=args.max_shard_failures, s3_endpoint_url=args.s3_endpoint_url,
        record=False,
    )
    summary = plan.summary() | ({"budget": night.summary()} if night else {})
    if not args.json:
        if night:
            sys.stderr.write(f"flat corpus: {night.describe()}\n")
        scope = f"partition {plan.ds}" if plan.mode == "dated" else "flat corpus"
        skipped = summary["skipped"]
        sys.stderr.write(strip_control(
            f"{scope} of {plan.candidates} shard(s), recipe {plan.recipe_id}: a run would publish"
            f" {len(plan.shards)} ({plan.retried} retried), skip {skipped['registered']} registered,"
            f" {skipped['quarantined']} quarantined and {skipped['failed']} failed for good;"
            f" {len(plan.held_back)} held back; {plan.left} left\n"
            + "".join(f"  {d['shard']}  {d['source_uri']}\n" for d in plan.shards)
        ))
    return summary


def cmd_requeue(args) -> dict:
    from maga_tasks.engine.requeue import requeue_shards

    registry = _registry(args, create=False)
    shards = requeue_shards(registry, args.output_root, args.recipe_id, args.shards, args.s3_endpoint_url)
    return {"recipe_id": args.recipe_id, "requeued": sum(s["requeued"] for s in shards), "shards": shards}


def cmd_bench(args) -> dict:
    from maga_tasks.tools.bench import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maga", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    expand = commands.add_parser("expand-shard", help="expand one source shard end to end")
    expand.add_argument("source", help="shard file: local path or s3://bucket/key (.parquet, .jsonl, .jsonl.gz)")
    expand.add_argument("--output-root", required=True, help="local folder or s3:// prefix")
    expand.add_argument(
        "--max-docs", type=int, help="trial: only the first N documents, written under ROOT/_trials/first-N/"
    )
    _add_run_options(expand)
    expand.set_defaults(func=cmd_expand_shard)

    sample = commands.add_parser("sample-corpus", help="write sample shards of real English text")
    sample.add_argument("out")
    sample.add_argument("--shards", type=int, default=3)
    sample.add_argument("--docs-per-shard", type=int, default=100)
    sample.add_argument("--format", default="parquet", choices=["parquet", "jsonl", "jsonl.gz"])
    sample.add_argument("--partitions", help="comma-separated dates: one folder of shards per date")
    sample.set_defaults(func=cmd_sample_corpus)

    server = commands.add_parser("test-llm-server", help="deterministic OpenAI-compatible server for tests")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--fault", action="append", default=[], help="KIND[:RATE][:TIMES], repeatable")
    server.add_argument("--latency-ms", type=float, default=0.0)
    server.add_argument("--model", default="maga-default", help="served model name (the built-in recipe's)")
    server.add_argument("--api-key")
    server.add_argument("--no-structured-outputs", action="store_true")
    server.set_defaults(func=cmd_test_llm_server)

    publish = commands.add_parser("publish-shard", help="lease, expand, validate and register one shard")
    publish.add_argument("source")
    publish.add_argument("--output-root", required=True)
    publish.add_argument("--registry", required=True, help="SQLite file path or postgresql:// URL")
    publish.add_argument(
        "--max-docs", type=int, help="trial: the first N documents under ROOT/_trials/first-N/, nothing registered"
    )
    publish.add_argument(
        "--judge-sample", type=int, default=0, help="judge N rewrites of a newly registered shard (0: no judge)"
    )
    _add_run_options(publish, "max_shard_failures", "data_docs_sample_rate", "lease_ttl_s")
    publish.set_defaults(func=cmd_publish_shard)

    judge = commands.add_parser("judge-shard", help="judge scores for a sample of a committed shard's rewrites")
    judge.add_argument("source", help="the source shard the output was expanded from")
    judge.add_argument("--output-root", required=True)
    judge.add_argument("--sample", type=int, default=32, help="rewrites to judge (the smallest row ids)")
    judge.add_argument("--shard", help="output shard name, when not derived from the file name")
    judge.add_argument("--registry", help="record the result (quality suite 'judge') in this registry")
    _add_run_options(judge)
    judge.set_defaults(func=cmd_judge_shard)

    db = commands.add_parser("db", help="metadata registry schema").add_subparsers(dest="db_command", required=True)
    upgrade = db.add_parser("upgrade", help="apply pending migrations from sql/")
    upgrade.add_argument("--registry", required=True, help="SQLite file path or postgresql:// URL")
    upgrade.set_defaults(func=cmd_db_upgrade)

    for name, func, text in (
        ("validate-shard", cmd_validate_shard, "run the data-quality gate on a shard"),
        ("register-shard", cmd_register_shard, "validate a committed shard, then register or quarantine it"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("source", help="the source shard the output was expanded from")
        sub.add_argument("--output-root", required=True)
        sub.add_argument("--recipe")
        sub.add_argument("--shard", help="output shard name, when not derived from the file name")
        sub.add_argument("--registry", required=name == "register-shard", help="SQLite path or postgresql:// URL")
        _add_settings(sub, "s3_endpoint_url")
        if name == "validate-shard":
            sub.add_argument("--input", action="store_true", help="check the source shard instead of the output")
        sub.set_defaults(func=func)

    status = commands.add_parser("status", help="registry totals: shards by status, documents, tokens")
    status.add_argument("--registry", required=True)
    status.add_argument("--recipe-id")
    status.add_argument("--json", action="store_true", help="only the JSON (otherwise a table on stderr too)")
    status.add_argument("--limit", type=int, default=20,
                        help="quarantined or failed shards listed, newest first (totals always cover every shard)")
    status.set_defaults(func=cmd_status)

    plan = commands.add_parser("plan", help="what a run would publish and skip; leases and writes nothing")
    plan.add_argument("source", help="source corpus folder or s3:// prefix; in dated mode with {ds}")
    plan.add_argument("--registry", required=True, help="SQLite path or postgresql:// URL")
    plan.add_argument("--recipe", help="recipe YAML (default: the built-in recipe)")
    plan.add_argument("--planning-mode", choices=["flat", "dated"], default="flat")
    plan.add_argument("--ds", help="dated mode: the partition date, YYYY-MM-DD")
    plan.add_argument("--budget", type=int,
                      help="flat mode: shards per run, 0 from the fleet (the DAG's shards_per_run; default: all)")
    plan.add_argument("--pool-slots", type=int, default=int(os.environ.get("MAGA_POOL_SLOTS", "8")),
                      help="--budget 0: slots of the maga_llm pool (default MAGA_POOL_SLOTS or 8)")
    plan.add_argument("--run-hours", type=float, help="--budget 0: hours a night's runs may take (default 8)")
    plan.add_argument("--shard-hours", type=float,
                      help="--budget 0: hours per shard (default: the median of the recipe's recent shards)")
    plan.add_argument("--max-shards", type=int,
                      help="most shards one run maps (the DAG uses Airflow's core.max_map_length; default: no limit)")
    _add_settings(plan, "max_shard_failures", "s3_endpoint_url")
    plan.add_argument("--json", action="store_true", help="only the JSON (otherwise a summary on stderr too)")
    plan.set_defaults(func=cmd_plan)

    requeue = commands.add_parser(
        "requeue", help="put quarantined or failed shards back in the plan; old output moved under _quarantine/"
    )
    requeue.add_argument("shards", nargs="+", metavar="SHARD")
    requeue.add_argument("--registry", required=True, help="SQLite path or postgresql:// URL")
    requeue.add_argument("--recipe-id", required=True)
    requeue.add_argument("--output-root", required=True, help="the corpus output root (local or s3://)")
    _add_settings(requeue, "s3_endpoint_url")
    requeue.set_defaults(func=cmd_requeue)

    from maga_tasks.tools.bench import add_arguments as add_bench_arguments

    bench = commands.add_parser("bench", help="pipeline vs engine throughput, client overhead")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    recipe = commands.add_parser("recipe", help="validate a recipe and print its recipe_id")
    recipe.add_argument("recipe", nargs="?")
    recipe.add_argument("--show", action="store_true", help="print the resolved recipe YAML on stderr")
    recipe.set_defaults(func=cmd_recipe)
    return parser


# Arguments that name storage roots or shard files, and those that name paths below them.
_ROOT_ARGUMENTS = ("output_root", "source")
_IDENTIFIER_ARGUMENTS = {"recipe_id": "recipe id", "shard": "shard name", "shards": "shard name"}


def check_arguments(args) -> None:
    """Roots in the form the backends use (`file:///abs` is /abs; another scheme is
    refused) and identifiers checked against the one pattern, before any command runs."""
    from maga_tasks.data.storage import storage_root
    from maga_tasks.identifiers import check_identifier

    for name in _ROOT_ARGUMENTS:
        if getattr(args, name, None) is not None:
            setattr(args, name, storage_root(getattr(args, name)))
    for name, what in _IDENTIFIER_ARGUMENTS.items():
        value = getattr(args, name, None)
        for item in value if isinstance(value, list) else [value] if value is not None else []:
            if isinstance(item, str):  # `sample-corpus --shards` is a count, not names
                check_identifier(item, what)


def _say_error(error: BaseException | str) -> None:
    """One line on stderr, through the redaction (an error may quote a URL, a body, a name)."""
    text = str(error) or type(error).__name__
    print(f"maga: error: {clean_text(text.splitlines()[0], 1000)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    install_log_redaction()  # secrets masked and escape sequences shown in every log line
    try:
        check_arguments(args)
        summary = args.func(args)
    except MagaError as error:
        _say_error(error)
        return error.exit_code
    except ValidationError as error:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        _say_error(f"invalid settings: {fields}")
        return EXIT_BAD_INPUT
    except ValueError as error:  # a value refused where it is parsed (an endpoint URL, a date)
        _say_error(error)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("maga: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary, default=str))
    return getattr(args, "exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
