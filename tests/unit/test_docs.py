"""The docs agree with the code: every relative link resolves, the module names of
"How one shard flows" import, and the reference lists (CLI options, DAG params, output
columns, reject reasons) are generated from the code or checked against it.

Generated blocks in docs/reference.md sit between `<!-- generated: NAME -->` and
`<!-- end generated -->`; after a change to the parser or the DAG's Params rewrite them
with `python tests/unit/test_docs.py` and commit the diff.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
REFERENCE = DOCS / "reference.md"
ARCHITECTURE = DOCS / "architecture.md"
DAG_FILE = REPO / "dags" / "maga_corpus_expansion.py"

GENERATED = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.DOTALL)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_IDENTIFIER = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section (up to the next heading of level 1 or 2)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^#{{1,2}} |\Z)", text, re.DOTALL | re.MULTILINE)
    assert match, f"no section '## {heading}'"
    return match.group(1)


def table_first_column(text: str) -> list[str]:
    """The backticked names in the first column of every table row of `text`."""
    names = []
    for line in text.splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2 and not set(cells[1].strip()) <= set("-: "):
            names += re.findall(r"`([^`]+)`", cells[1])
    return names


# -- links ---------------------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    seen: dict[str, int] = {}
    found = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"^#{1,6} (.+?)\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links() -> list[str]:
    broken = []
    for page in markdown_files():
        for target in _LINK.findall(_FENCE.sub("", page.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto: not ours to check offline
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(REPO)} -> {target}"
            if not linked.exists():
                broken.append(f"{where}: no such file")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
                broken.append(f"{where}: no such heading")
    return broken


def test_every_relative_link_resolves_to_a_file_and_heading():
    assert broken_links() == []


def test_the_link_check_sees_a_broken_link(tmp_path):
    # The checker itself can fail: a slug it computes matches a real heading, a made-up one does not.
    assert "how-one-shard-flows" in anchors(ARCHITECTURE)
    assert "no-such-heading" not in anchors(ARCHITECTURE)


def test_readme_stays_short_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in DOCS.glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"
    two_commands = section(readme, "The two commands")
    assert "make demo" in two_commands and "make test" in two_commands


# -- how one shard flows -------------------------------------------------------------


def cited_names() -> list[str]:
    body = section(ARCHITECTURE.read_text(), "How one shard flows")
    return re.findall(r"`(maga_tasks(?:\.\w+)+)`", body)


def resolve(dotted: str):
    """The object a dotted name points at: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_every_module_and_function_the_shard_flow_cites_imports():
    names = cited_names()
    assert len(names) >= 15, names  # the section names the path, not two words of it
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            missing.append(f"{name}: {error}")
    assert missing == []


# -- generated reference: CLI options and DAG params ---------------------------------


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _default(value) -> str:
    if value is None or value is False or value == [] or value == "" or value == argparse.SUPPRESS:
        return ""
    text = str(value).replace(str(REPO), ".")
    return f"`{text}`"


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
        notes = []
        if action.required and action.option_strings:
            notes.append("required")
        if action.option_strings and action.nargs == 0:
            notes.append("a flag")
        if action.choices:
            notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
        if isinstance(action, argparse._AppendAction) and "repeatable" not in (action.help or ""):
            notes.append("repeatable")
        help_text = "; ".join(filter(None, [action.help or "", *notes]))
        rows.append(f"| {name} | {_default(action.default)} | {_cell(help_text)} |")
    return rows


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "maga"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", helps.get(name, ""), sub
                yield from _subcommands(sub, f"{prefix} {name}")


def cli_commands() -> list[str]:
    """Every runnable `maga ...` command of the parser (a group such as `maga db` is not one)."""
    from maga_tasks.cli import build_parser

    return [
        name for name, _, sub in _subcommands(build_parser())
        if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
    ]


def render_cli_options() -> str:
    from maga_tasks.cli import build_parser

    out = []
    for name, help_text, sub in _subcommands(build_parser()):
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            continue
        out += [f"### `{name}`", "", f"{help_text[:1].upper()}{help_text[1:]}.", "",
                "| argument | default | what it does |", "|---|---|---|", *_option_rows(sub), ""]
    return "\n".join(out)


def _dag_params() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("maga_dag_for_docs", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PARAMS


_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<="}


def render_dag_params() -> str:
    out = ["| param | type | default | what it sets |", "|---|---|---|---|"]
    for name, param in _dag_params().items():
        schema = param.schema
        kinds = schema.get("type")
        kind = " or ".join(k for k in kinds if k != "null") + " or empty" if isinstance(kinds, list) else kinds
        bounds = [f"{sign} {schema[key]}" for key, sign in _BOUNDS.items() if key in schema]
        if "enum" in schema:
            bounds.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
        value = param.value
        shown = value if isinstance(value, str) else json.dumps(value)
        default = "" if value is None or value == [] or value == "" else shown
        text = "; ".join(filter(None, [schema.get("description") or param.description or "", *bounds]))
        out.append(f"| `{name}` | {kind} | {f'`{default}`' if default else ''} | {_cell(text)} |")
    return "\n".join(out) + "\n"


RENDERERS = {"cli-options": render_cli_options, "dag-params": render_dag_params}


def render_in_clean_env(name: str) -> str:
    """A generated block, rendered in a child process without MAGA_* and AIRFLOW_*
    variables, so defaults read from the environment show their built-in values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAGA_", "AIRFLOW"))}
    with tempfile.TemporaryDirectory(prefix="maga-docs-") as home:
        env.update(AIRFLOW_HOME=home, PYTHONPATH=str(REPO), AIRFLOW__CORE__LOAD_EXAMPLES="False")
        rendered = Path(home) / f"{name}.md"  # not stdout: Airflow logs its warnings there
        done = subprocess.run(
            [sys.executable, str(Path(__file__)), "--render", name, str(rendered)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return rendered.read_text()


def rewrite_generated_blocks() -> None:
    text = REFERENCE.read_text()
    REFERENCE.write_text(
        GENERATED.sub(lambda m: m.group(1) + render_in_clean_env(m.group(2)) + m.group(4), text)
    )


def test_generated_reference_blocks_match_the_code():
    blocks = {m.group(2): m.group(3) for m in GENERATED.finditer(REFERENCE.read_text())}
    assert set(blocks) == set(RENDERERS)
    stale = [name for name, body in blocks.items() if body != render_in_clean_env(name)]
    assert stale == [], f"docs/reference.md is stale in {stale}: run `python tests/unit/test_docs.py`"


def test_the_command_table_lists_every_command_of_the_parser():
    listed = [re.match(r"maga [a-z-]+(?: [a-z][a-z-]*)?", name) for name in
              table_first_column(section(REFERENCE.read_text(), "Commands"))]
    documented = {m.group(0) for m in listed if m}
    commands = set(cli_commands())
    commands.discard("maga db")
    assert documented == commands


# -- output columns ------------------------------------------------------------------


def test_output_column_tables_match_the_schemas():
    from maga_tasks.data.schema import (
        ACCEPTED_SCHEMA,
        MAGACORPUS_SCHEMA,
        REJECTED_SCHEMA,
    )

    columns = section(REFERENCE.read_text(), "Output columns")
    tables = re.split(r"^### ", columns, flags=re.MULTILINE)[1:]
    named = {table.splitlines()[0]: table_first_column(table) for table in tables}
    assert named["`data/` rows"] == ACCEPTED_SCHEMA.names
    assert named["`rejected/` rows"] == REJECTED_SCHEMA.names[len(ACCEPTED_SCHEMA.names):]
    magacorpus = MAGACORPUS_SCHEMA.field("meta").type
    expected = [f"meta.{magacorpus.field(i).name}" for i in range(magacorpus.num_fields)] + ["content_split"]
    assert named["`magacorpus/` rows"] == expected


# -- reject reasons ------------------------------------------------------------------

# Where reasons are written today, and the calls and names that carry one.
def _words(node: ast.AST, constants: dict[str, str]) -> list[str]:
    """The string a cause argument spells: a literal, an f-string with `*` for its
    placeholders, or a module constant; nothing for a value passed on."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(p.value if isinstance(p, ast.Constant) else "*" for p in node.values)]
    if isinstance(node, ast.Name) and node.id in constants:
        return [constants[node.id]]
    return []


def _call_name(node: ast.Call) -> str:
    return getattr(node.func, "id", None) or getattr(node.func, "attr", "")


def _request_failure_causes() -> set[str]:
    """Why a request failed for good, as the client raises it to a stage (a failure made
    `retryable=True` is retried inside the client, never seen by a stage). Only a 4xx
    reaches a row as `http_NNN`: every other status is retried until `retries_exhausted`."""
    causes = set()
    for module in sorted((REPO / "maga_tasks" / "llm").glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Call) and _call_name(node) == "RequestFailure" and node.args:
                retryable = any(
                    k.arg == "retryable" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                for word in () if retryable else _words(node.args[0], {}):
                    causes.add("http_4xx" if word == "http_*" else word)
    return causes


def _with_causes(judge: bool) -> set[str]:
    from maga_tasks.reject_reasons import RejectReason

    causes = _request_failure_causes()
    mine = [r for r in RejectReason if r.value.startswith("judge_") == judge]
    return {r.value for r in mine if not r.is_prefix} | {r.with_cause(c) for r in mine if r.is_prefix for c in causes}


def reject_reasons() -> set[str]:
    """Every reject reason a row of `rejected/` can carry: `RejectReason`'s whole reasons and
    its request prefixes with each cause the client gives."""
    return _with_causes(judge=False)


def judge_failures() -> set[str]:
    """Why a sampled row got no judge score (`judge.json`'s failures)."""
    return _with_causes(judge=True)


def test_the_reject_reason_table_lists_exactly_the_reasons_the_code_writes():
    reasons = reject_reasons()
    # The collector sees the reasons the old README list missed, and the request families.
    assert {"task_talk", "pairs_not_in_catalogue", "duplicate_id", "rewrite_request_endpoint_died"} <= reasons
    documented = table_first_column(section(REFERENCE.read_text(), "Reject reasons"))
    assert len(documented) == len(set(documented)), "a reason is listed twice"
    assert set(documented) == reasons


def test_the_judge_failure_table_lists_exactly_the_failures_the_code_writes():
    failures = judge_failures()
    assert "judge_invalid_answer" in failures
    documented = table_first_column(section(REFERENCE.read_text(), "Judge failures"))
    assert set(documented) == failures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        Path(sys.argv[3]).write_text(RENDERERS[sys.argv[2]]())
    else:
        rewrite_generated_blocks()
        print(f"rewrote the generated blocks of {REFERENCE.relative_to(REPO)}")
