"""The `maga` command line: the library's operations without Airflow.

Progress goes to stderr; a command's result is JSON on the last line of stdout. Errors
end with a one-line message and a non-zero exit code, never a traceback:
2 for bad input (recipe, shard, arguments), 3 when the LLM endpoints are unreachable,
1 for anything else the pipeline refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pydantic import ValidationError

from .errors import EndpointsUnavailable, MagaError
from .layout import LayoutError
from .recipe import RecipeError
from .storage import StorageError

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


def _settings(args, **extra):
    from .settings import RunSettings

    return RunSettings(
        endpoints=tuple(args.endpoint),
        max_concurrency=args.concurrency,
        request_timeout_s=args.request_timeout,
        s3_endpoint_url=args.s3_endpoint_url,
        progress_interval_s=args.progress_interval,
        served_model=args.served_model,
        **extra,
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="recipe YAML (default: the built-in recipe)")
    parser.add_argument("--endpoint", action="append", required=True, help="LLM server base URL (repeatable)")
    parser.add_argument("--served-model", help="model name the servers serve, when not the recipe's")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight across endpoints")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: boto3's configuration)")
    parser.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--id-column", default="id")


def cmd_expand_shard(args) -> dict:
    from .recipe import load_recipe
    from .shard import expand_shard
    from .source import SourceColumns

    recipe = load_recipe(args.recipe)
    result = expand_shard(
        args.source,
        args.output_root,
        recipe,
        _settings(args),
        max_docs=args.max_docs,
        columns=SourceColumns(id=args.id_column, text=args.text_column),
    )
    return result.to_dict()


def cmd_sample_corpus(args) -> dict:
    from .sample_corpus import write_sample_corpus

    partitions = args.partitions.split(",") if args.partitions else None
    paths = write_sample_corpus(args.out, args.shards, args.docs_per_shard, fmt=args.format, partitions=partitions)
    return {"shards": [str(p) for p in paths], "documents": len(paths) * args.docs_per_shard}


def cmd_test_llm_server(args) -> dict:
    from .test_server import parse_fault, run_server

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
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.show:
        sys.stderr.write(recipe.to_yaml())
    return {"recipe_id": recipe.recipe_id, "name": recipe.name, "model": recipe.model, "prompt_version": recipe.prompt_version}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maga", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    expand = commands.add_parser("expand-shard", help="expand one source shard end to end")
    expand.add_argument("source", help="shard file: local path or s3://bucket/key (.parquet, .jsonl, .jsonl.gz)")
    expand.add_argument("--output-root", required=True, help="local folder or s3:// prefix")
    expand.add_argument("--max-docs", type=int, help="only the first N documents (trial runs)")
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
    server.add_argument("--model", default="maga-test")
    server.add_argument("--api-key")
    server.add_argument("--no-structured-outputs", action="store_true")
    server.set_defaults(func=cmd_test_llm_server)

    recipe = commands.add_parser("recipe", help="validate a recipe and print its recipe_id")
    recipe.add_argument("recipe", nargs="?")
    recipe.add_argument("--show", action="store_true", help="print the resolved recipe YAML on stderr")
    recipe.set_defaults(func=cmd_recipe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        summary = args.func(args)
    except EndpointsUnavailable as error:
        print(f"maga: error: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ValidationError as error:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        print(f"maga: error: invalid settings: {fields}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MagaError, RecipeError, LayoutError, StorageError, ValueError) as error:
        print(f"maga: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("maga: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
