"""Hostile run conf and the operator's edges, each case a real server, file or process.

- A run's conf (half-trusted) chooses among the endpoints the operator configured and
  names a recipe in the operator's recipes folder: a foreign endpoint or a recipe path is
  refused through the DAG's own tasks (`airflow dags test --conf`) before any request, and
  a hostile server on loopback receives nothing, the API key least of all.
- Recipes: errors name the file and the kind of problem, never a line of it; deep YAML,
  oversized files and unknown placeholders are one line of `maga recipe`.
- The operator's edges (`maga` subprocesses): an unreachable registry, a missing SQLite
  file for a read command, `file://` and unknown-scheme roots, path-climbing identifiers:
  one line, the right exit code, nothing created or moved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maga_tasks.identifiers import IdentifierError, check_identifier
from maga_tasks.recipe import MAX_RECIPE_BYTES, RecipeError, builtin_recipe_path, load_recipe
from maga_tasks.run_conf import (
    ConfRefused,
    checked_params,
    choose_endpoints,
    conf_recipe,
    conf_recipe_path,
    configured_endpoints,
    connection_endpoints,
    operator_data_roots,
)
from tests.support.airflow import DAG_ID
from tests.support.paths import REPO

SECRET_KEY = "sk-hostile-test-0123456789abcdef"
# What a credentials file holds; none of it may come back in an error.
CREDENTIALS = (
    "[default]\naws_access_key_id = AKIAEXAMPLEKEYID0000\naws_secret_access_key = wJalrXUtnFEMIexamplesecret\n"
)
CREDENTIAL_WORDS = ("AKIAEXAMPLEKEYID0000", "wJalrXUtnFEMIexamplesecret", "aws_secret_access_key")


def run_maga(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`maga ARGS` in a subprocess that imports this tree."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "maga_tasks.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=environment)


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, *expected: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("maga: error: "), done.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# -- endpoints: a conf chooses among the configured ones ---------------------------------

CONFIGURED = ("http://vllm-0:8000", "https://vllm-1.example:8443/v1")


@pytest.mark.parametrize(
    "requested, chosen",
    [
        pytest.param([], CONFIGURED[:1] + ("https://vllm-1.example:8443",), id="none-named-means-all"),
        pytest.param(["http://vllm-0:8000/v1/"], ("http://vllm-0:8000",), id="subset-in-another-spelling"),
        pytest.param(["HTTPS://VLLM-1.example:8443"], ("https://vllm-1.example:8443",), id="host-case-ignored"),
    ],
)
def test_a_conf_may_narrow_the_configured_endpoints(requested, chosen):
    assert choose_endpoints(requested, CONFIGURED) == chosen


@pytest.mark.parametrize(
    "requested",
    [
        pytest.param("http://evil.example:8000", id="foreign-host"),
        pytest.param("http://vllm-0:8001", id="other-port"),
        pytest.param("https://vllm-0:8000", id="other-scheme"),
        pytest.param("http://key:hunter2-secret@vllm-0:8000", id="user-info-added"),
        pytest.param("http://vllm-0:8000@evil.example", id="host-behind-user-info"),
        pytest.param("http://vllm-0:8000/../x", id="other-path"),
        pytest.param("ftp://vllm-0:8000", id="not-http"),
    ],
)
def test_a_conf_cannot_add_an_endpoint(requested):
    with pytest.raises(ConfRefused) as refused:
        choose_endpoints(["http://vllm-0:8000", requested], CONFIGURED)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "hunter2-secret" not in message


def test_configured_endpoints_come_from_the_environment_and_the_connection():
    from_connection = connection_endpoints("http", "vllm-2", 8000, None, {"endpoints": ["http://vllm-3:8000"]})
    assert from_connection == ["http://vllm-2:8000", "http://vllm-3:8000"]
    assert connection_endpoints("generic", None, None, None, {"endpoints": "http://a:1, http://b:2"}) == ["http://a:1", "http://b:2"]
    assert configured_endpoints(["http://vllm-0:8000/"], from_connection) == (
        "http://vllm-0:8000", "http://vllm-2:8000", "http://vllm-3:8000")
    assert configured_endpoints([], []) == ("http://127.0.0.1:8000",)  # nothing configured: a local worker


# -- recipes: a conf names one, the operator's folder holds it ------------------------


@pytest.fixture
def recipes(tmp_path) -> Path:
    """The operator's recipes folder with one recipe, and a credentials file beside it."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "night.yaml").write_text(load_recipe().to_yaml(), encoding="utf-8")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "credentials.yaml").write_text(CREDENTIALS)
    (folder / "linked.yaml").symlink_to(secrets / "credentials.yaml")
    return folder


def test_a_conf_recipe_is_a_name_in_the_operators_folder_or_built_in(recipes):
    assert conf_recipe_path("night", recipes) == recipes / "night.yaml"
    assert conf_recipe_path("tiny", recipes) == builtin_recipe_path("tiny")
    assert conf_recipe_path(None, recipes) is None  # the built-in default
    assert conf_recipe_path(None, recipes, operator_default="night") == recipes / "night.yaml"
    assert conf_recipe("night", recipes).recipe_id == load_recipe().recipe_id


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("../secrets/credentials", id="climbs-out"),
        pytest.param("{tmp}/secrets/credentials.yaml", id="absolute-path"),
        pytest.param("~/.aws/credentials", id="home-path"),
        pytest.param("..", id="dot-dot"),
        pytest.param("linked", id="symlink-out-of-folder"),
        pytest.param("missing", id="unknown-name"),
        pytest.param("night\x1b[2J", id="escape-sequence"),
    ],
)
def test_a_conf_recipe_path_is_refused_without_quoting_the_file(recipes, name):
    with pytest.raises(ConfRefused) as refused:
        conf_recipe(name.format(tmp=recipes.parent), recipes)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "\x1b" not in message
    assert not any(word in message for word in CREDENTIAL_WORDS), message


@pytest.mark.parametrize(
    "params, refused",
    [
        pytest.param({"output_root": "file://host/x"}, "output_root", id="file-url-with-host"),
        pytest.param({"output_root": "gopher://x/y"}, "output_root", id="unknown-scheme"),
        pytest.param({"source": "file:relative"}, "source", id="file-url-not-absolute"),
        pytest.param({"requeue": ["../../x"]}, "requeue", id="requeue-climbs-out"),
    ],
)
def test_a_conf_with_bad_roots_or_names_is_refused(tmp_path, params, refused):
    base = {"source": str(tmp_path / "src"), "output_root": str(tmp_path / "out"), "endpoints": [], "requeue": []}
    with pytest.raises(ConfRefused, match=refused):
        checked_params({**base, **params}, ["http://vllm-0:8000"])


def test_a_file_url_root_is_its_absolute_path(tmp_path):
    base = {"source": f"file://{tmp_path}/src/{{ds}}/", "output_root": f"file://{tmp_path}/out", "endpoints": []}
    checked = checked_params(base, ["http://vllm-0:8000"])
    assert checked["source"] == f"{tmp_path}/src/{{ds}}/" and checked["output_root"] == f"{tmp_path}/out"
    assert checked["endpoints"] == ["http://vllm-0:8000"]


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"source": "/etc"}, id="source-outside"),
        pytest.param({"output_root": "{tmp}/data/../../elsewhere"}, id="output-climbs-out"),
        pytest.param({"source": "{tmp}/data/link-out/{{ds}}"}, id="symlink-leads-out"),
        pytest.param({"output_root": "s3://other-bucket/x"}, id="foreign-bucket"),
        pytest.param({"output_root": "s3://corpus/expanded-evil"}, id="s3-prefix-sibling"),
    ],
)
def test_a_conf_root_outside_the_operators_data_roots_is_refused(tmp_path, params):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link-out").symlink_to("/etc")
    roots = [str(tmp_path / "data"), "s3://corpus/expanded"]
    base = {"source": str(tmp_path / "data" / "src"), "output_root": "s3://corpus/expanded/v1", "endpoints": []}
    asked = {key: value.format(tmp=tmp_path) for key, value in params.items()}
    assert checked_params(base, ["http://vllm-0:8000"], roots)["source"] == base["source"]
    with pytest.raises(ConfRefused, match="outside the data roots"):
        checked_params({**base, **asked}, ["http://vllm-0:8000"], roots)


def test_the_operators_data_roots_come_from_its_environment(tmp_path):
    roots = operator_data_roots({"MAGA_DATA_ROOTS": "s3://a/b, /srv/x", "MAGA_SOURCE": "file:///data/src/{ds}"},
                                "/data/maga/source", "/data/maga/expanded")
    assert roots == ["s3://a/b", "/srv/x", "/data/src/", "/data/maga/expanded"]


# -- through the DAG's own tasks --------------------------------------------------------


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", ["foreign-endpoint", "recipe-path"])
def test_the_dag_refuses_a_hostile_conf_before_any_request(case, dags_test_env, hostile_server, recipes, tmp_path):
    """One `airflow dags test` per case: the run fails, the refusal is one line naming what
    was refused, and the hostile server received no request, so never the key."""
    from maga_tasks.data.sample_corpus import write_sample_corpus

    write_sample_corpus(tmp_path / "corpus", shards=1, docs_per_shard=2)
    conf = {"source": str(tmp_path / "corpus"), "output_root": str(tmp_path / "out"), "planning_mode": "flat"}
    env = {"MAGA_API_KEY": SECRET_KEY, "MAGA_RECIPES_DIR": str(recipes)}
    if case == "foreign-endpoint":
        # The operator configured a worker (down: it would fail, not refuse); the conf
        # names the hostile host instead, with user-info of its own.
        hostile = hostile_server.url.replace("http://", "http://tok:conf-pass-42@")
        conf |= {"endpoints": [hostile], "recipe": "night"}
        env["MAGA_ENDPOINTS"] = "http://127.0.0.1:9"
        expected = "endpoint 'http://***@127.0.0.1:"
    else:
        # The hostile host is even the configured endpoint: the recipe path is refused
        # before the sensor sends it anything.
        conf |= {"recipe": str(recipes.parent / "secrets" / "credentials.yaml")}
        env["MAGA_ENDPOINTS"] = hostile_server.url
        expected = "is not a recipe name"
    done = dags_test_env.cli("dags", "test", DAG_ID, "2025-01-01", "-c", json.dumps(conf), extra_env=env,
                           timeout=500, check=False)
    output = done.stdout + done.stderr
    assert "state=failed" in output, output[-5000:]
    assert hostile_server.requests == [], hostile_server.requests
    refusals = [line for line in output.splitlines() if "run conf:" in line and expected in line]
    assert refusals, output[-5000:]
    assert "conf-pass-42" not in "\n".join(refusals) and SECRET_KEY not in output
    assert not any(word in output for word in CREDENTIAL_WORDS)
    assert not (tmp_path / "out" / load_recipe().recipe_id / "data").exists()


# -- recipes at `maga recipe` time -------------------------------------------------------


def _default_yaml() -> str:
    return builtin_recipe_path("default").read_text(encoding="utf-8")


RECIPE_FILES = [
    pytest.param("creds.yaml", CREDENTIALS, "not valid YAML (parser error at line 2, column 1)", id="credentials-file"),
    pytest.param("deep.yaml", "a: " + "[" * 50_000 + "]" * 50_000, "nested deeper than", id="nested-50000-deep"),
    pytest.param("deep-map.yaml", "".join(" " * i + f"k{i}:\n" for i in range(200)), "nested deeper than",
                 id="nested-mappings"),
    pytest.param("big.yaml", "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1), "a recipe may have", id="over-1-MB"),
    pytest.param("aliases.yaml", "a: &a [1]\n" + "".join(f"b{i}: *a\n" for i in range(200)), "aliases",
                 id="alias-bomb"),
    pytest.param("placeholder.yaml", None, "unknown placeholder '{colour}'", id="unknown-placeholder"),
    pytest.param("attribute.yaml", None, "unknown placeholder '{genre.__class__}'", id="attribute-placeholder"),
    pytest.param("binary.yaml", b"\xff\xfe\x00k: v", "not UTF-8 text", id="not-utf8"),
]


@pytest.mark.parametrize("name, content, expected", RECIPE_FILES)
def test_maga_recipe_refuses_a_bad_recipe_in_one_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is None:  # the built-in recipe with one placeholder the code does not fill
        field = "{colour}" if "placeholder" in name else "{genre.__class__}"
        content = _default_yaml().replace("{genre}", "{genre} " + field, 1)
        assert content != _default_yaml()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    done = run_maga("recipe", str(path), cwd=tmp_path)
    line = assert_one_line_error(done, 2, expected, str(path))
    assert "Traceback" not in done.stderr and not any(word in line for word in CREDENTIAL_WORDS)
    with pytest.raises(RecipeError):
        load_recipe(path)


# -- the operator's edges ----------------------------------------------------------------


@pytest.fixture
def closed_port_url():
    """A PostgreSQL URL (with a password) to a loopback port nothing listens on."""
    from tests.support.servers import free_port

    return f"postgresql://maga:pg-secret-77@127.0.0.1:{free_port()}/maga"


@pytest.mark.integration
def test_an_unreachable_registry_is_one_line_exit_3(tmp_path, closed_port_url):
    for command in (["status"], ["db", "upgrade"]):
        done = run_maga(*command, "--registry", closed_port_url, cwd=tmp_path)
        line = assert_one_line_error(done, 3, "is unreachable", "127.0.0.1")
        assert "pg-secret-77" not in done.stderr and "sqlalche.me" not in line


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["status"], id="status"),
        pytest.param(["status", "--recipe-id", "r-0"], id="status-of-a-recipe"),
        pytest.param(["plan", "{tmp}/src"], id="plan"),
        pytest.param(["requeue", "part-0000", "--recipe-id", "r-0", "--output-root", "{tmp}/out"], id="requeue"),
    ],
)
def test_a_read_command_on_a_missing_sqlite_file_creates_nothing(tmp_path, command):
    missing = tmp_path / "typo" / "registry.sqlite"
    args = [part.format(tmp=tmp_path) for part in command]
    done = run_maga(*args, "--registry", str(missing), cwd=tmp_path)
    assert_one_line_error(done, 2, "registry file not found", str(missing))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def quarantined_shard(tmp_path):
    """A registry with a quarantined shard, and a sentinel folder two levels above the
    output root that a climbing recipe id or shard name would reach."""
    from maga_tasks.data.layout import shard_paths
    from maga_tasks.registry import Registry

    registry_path = tmp_path / "registry.sqlite"
    registry = Registry(str(registry_path))
    registry.upgrade()
    registry.close()
    root = tmp_path / "a" / "b" / "out"
    root.mkdir(parents=True)
    sentinel = tmp_path / "a" / "x" / "data" / "keep.parquet"
    sentinel.parent.mkdir(parents=True)
    sentinel.write_bytes(b"operator data")
    assert Path(shard_paths(str(root), "r-0", "s").version_root).parent == root
    return registry_path, root, sentinel


@pytest.mark.parametrize(
    "recipe_id, shard, refused",
    [
        pytest.param("../../x", "keep", "invalid recipe id '../../x'", id="recipe-id-climbs-out"),
        pytest.param("r-0", "../../../x/data/keep", "invalid shard name", id="shard-climbs-out"),
        pytest.param("/abs", "keep", "invalid recipe id '/abs'", id="absolute-recipe-id"),
        pytest.param("r-0", ".hidden", "invalid shard name '.hidden'", id="hidden-shard"),
    ],
)
def test_requeue_refuses_identifiers_that_climb_out_and_moves_nothing(
    quarantined_shard, tmp_path, recipe_id, shard, refused
):
    registry_path, root, sentinel = quarantined_shard
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    done = run_maga("requeue", shard, "--recipe-id", recipe_id, "--output-root", str(root),
                    "--registry", str(registry_path), cwd=tmp_path)
    assert_one_line_error(done, 2, refused)
    assert sentinel.read_bytes() == b"operator data"
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "identifier",
    ["part-0000", "2024-01-01_part-0001", "r-233c59313953", "ds=2024-01-01", "a.b_c"],
)
def test_names_the_pipeline_makes_pass_the_one_pattern(identifier):
    assert check_identifier(identifier) == identifier


@pytest.mark.parametrize("identifier", ["", ".", "..", "a/b", "../x", ".x", "a..b", "a b", "x\n", "é", "a" * 201])
def test_the_one_pattern_refuses_what_could_name_another_path(identifier):
    with pytest.raises(IdentifierError):
        check_identifier(identifier)


@pytest.mark.parametrize(
    "root, refused",
    [
        pytest.param("file://host/x", "file:///absolute/path", id="file-url-with-host"),
        pytest.param("file:relative/x", "file:///absolute/path", id="file-url-relative"),
        pytest.param("ftp://host/x", "unsupported storage URI scheme", id="ftp"),
        pytest.param("s3://", "needs a bucket", id="s3-without-bucket"),
    ],
)
def test_a_malformed_output_root_is_one_line_and_creates_nothing(tmp_path, root, refused):
    source = tmp_path / "s.jsonl"
    source.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    done = run_maga(
        "expand-shard", str(source), "--output-root", root, "--endpoint", "http://127.0.0.1:9", cwd=tmp_path
    )
    assert_one_line_error(done, 2, refused)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


@pytest.mark.integration
def test_a_file_url_output_root_writes_under_its_absolute_path(tmp_path, llm_server, sample_articles):
    from tests.support.shards import write_source_shard

    source = tmp_path / "part-0000.parquet"
    write_source_shard(source, [{"id": f"d{i}", "text": a["text"]} for i, a in enumerate(sample_articles[:2])])
    work = tmp_path / "cwd"
    work.mkdir()
    done = run_maga("-q", "expand-shard", f"file://{source}", "--output-root", f"file://{tmp_path}/out",
                    "--endpoint", llm_server.url, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / load_recipe().recipe_id / "data" / "part-0000.parquet").is_file()
    assert list(work.iterdir()) == []  # nothing under ./file:
