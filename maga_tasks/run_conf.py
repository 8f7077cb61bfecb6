"""What a run's conf may choose, within what the operator configured.

Who triggers a run with conf is half-trusted: the conf may choose among the endpoints
the operator configured (`MAGA_ENDPOINTS`, the `maga_llm` connection) or narrow them to
a subset, never add a host the API key would be sent to; it names a recipe, looked
up in the operator's recipes folder or among the built-in ones, never a path on the
worker; and its source and output root lie inside the data roots the operator allows
(`MAGA_DATA_ROOTS`, plus the operator's own `MAGA_SOURCE` and `MAGA_OUTPUT_ROOT`), so a
conf can neither read a worker's files into the corpus nor write over them. Whatever
the conf asks outside that is refused here, before any request, with one line
(`ConfRefused`). The operator's own settings (environment, connections,
Variables, the CLI's arguments) are trusted and never pass through here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from maga_tasks.data.storage import BadStorageURI, storage_root
from maga_tasks.errors import EXIT_BAD_INPUT, MagaError
from maga_tasks.identifiers import is_identifier, shown
from maga_tasks.recipe import Recipe, builtin_recipes_dir, load_recipe
from maga_tasks.redaction import redact_url, strip_control
from maga_tasks.settings import normalize_endpoint

# Where a worker's vLLM server listens when the operator configured none (local runs).
DEFAULT_ENDPOINT = "http://127.0.0.1:8000"
RECIPE_SUFFIX = ".yaml"


class ConfRefused(MagaError):
    """A run's conf asks for what the operator did not configure."""

    exit_code = EXIT_BAD_INPUT


def split_endpoints(raw: str | Iterable[str] | None) -> list[str]:
    """Endpoints from a comma-separated string (an environment variable) or a list."""
    if raw is None:
        return []
    items = raw.split(",") if isinstance(raw, str) else raw
    return [str(url).strip() for url in items if str(url).strip()]


def connection_endpoints(conn_type: str | None, host: str | None, port: int | None, schema: str | None,
                         extra: dict | None) -> list[str]:
    """The endpoints a `maga_llm` connection names: its host (with port; https when its
    type or schema says so) and the list or comma-separated string in extra `endpoints`."""
    found = split_endpoints((extra or {}).get("endpoints"))
    if host:
        if "://" in host:
            found.insert(0, host)
        else:
            scheme = "https" if "https" in (conn_type, schema) else "http"
            found.insert(0, f"{scheme}://{host}" + (f":{port}" if port else ""))
    return found


def configured_endpoints(*sources: Iterable[str]) -> tuple[str, ...]:
    """Every endpoint the operator configured (normalized, in order, once each);
    `DEFAULT_ENDPOINT` when none was."""
    urls = [normalize_endpoint(url) for source in sources for url in source]
    return tuple(dict.fromkeys(urls)) or (DEFAULT_ENDPOINT,)


def choose_endpoints(requested: Iterable[str] | None, configured: Iterable[str]) -> tuple[str, ...]:
    """The endpoints a run uses: those its conf names, each one of `configured`; all of
    `configured` when it names none. A name outside them is refused (the first one, its
    user-info masked) before anything is sent anywhere."""
    allowed = tuple(dict.fromkeys(normalize_endpoint(url) for url in configured))
    chosen = []
    for url in requested or ():
        try:
            normal = normalize_endpoint(url)
        except ValueError as error:
            raise ConfRefused(f"run conf: {error}") from None
        if normal not in allowed:
            raise ConfRefused(
                f"run conf: endpoint {_shown_url(url)} is not one of the {len(allowed)} the operator configured"
                " (MAGA_ENDPOINTS, connection maga_llm): refused before any request"
            )
        chosen.append(normal)
    return tuple(dict.fromkeys(chosen)) or allowed


def _shown_url(url: object) -> str:
    return repr(strip_control(redact_url(str(url)))[:200])


def conf_recipe_path(
    name: str | None, recipes_dir: str | Path | None, operator_default: str | None = None
) -> Path | None:
    """The file of the recipe a run uses (None: the built-in default).

    `name` (from the conf) must match the identifier pattern and is `{name}.yaml` in
    `recipes_dir` (the operator's folder) or else among the built-in recipes; a file
    there that resolves outside its folder (a symlink) is refused too. Without a name,
    `operator_default` (MAGA_RECIPE: a name as above, or a path the operator chose).
    """
    if not name:
        if not operator_default:
            return None
        if not is_identifier(operator_default):
            return Path(operator_default)  # the operator's own path: trusted
        name = operator_default
    if not is_identifier(name):
        raise ConfRefused(
            f"run conf: recipe {shown(name)} is not a recipe name (letters, digits, '.', '_', '=', '-';"
            " no path): refused before any request"
        )
    folders = [Path(recipes_dir)] if recipes_dir else []
    for folder in [*folders, builtin_recipes_dir()]:
        candidate = folder / f"{name}{RECIPE_SUFFIX}"
        if candidate.is_file():
            if not candidate.resolve().is_relative_to(folder.resolve()):
                raise ConfRefused(f"run conf: recipe {shown(name)} leads out of its folder {folder}: refused")
            return candidate
    where = f"the recipes folder {recipes_dir} nor in " if recipes_dir else ""
    raise ConfRefused(
        f"run conf: recipe {shown(name)} is not in {where}the built-in recipes: refused before any request"
    )


def conf_recipe(name: str | None, recipes_dir: str | Path | None, operator_default: str | None = None) -> Recipe:
    """The recipe a run's conf names (see `conf_recipe_path`), loaded and validated."""
    return load_recipe(conf_recipe_path(name, recipes_dir, operator_default))


def inside_roots(root: str, allowed: Iterable[str]) -> bool:
    """Whether `root` (a storage root as `storage_root` gives it, possibly a `{ds}`
    template) lies inside one of `allowed`. A `..` part is never inside; local paths
    are compared resolved, so a symlink cannot lead out."""
    if ".." in root.replace("\\", "/").split("/"):
        return False
    fixed = root.split("{", 1)[0]  # a dated template: its fixed part decides
    for base in allowed:
        if root.startswith("s3://") or base.startswith("s3://"):
            base = base.rstrip("/")
            if fixed == base or fixed.startswith(base + "/"):
                return True
        elif Path(os.path.realpath(fixed)).is_relative_to(os.path.realpath(base)):
            return True
    return False


def operator_data_roots(environ: Mapping[str, str], default_source: str, default_output_root: str) -> list[str]:
    """The roots a conf's source and output root may lie in: `MAGA_DATA_ROOTS`
    (comma-separated folders or s3:// prefixes) and the operator's own source and output
    root (`MAGA_SOURCE`, `MAGA_OUTPUT_ROOT`, else the DAG's defaults)."""
    named = [*split_endpoints(environ.get("MAGA_DATA_ROOTS")), environ.get("MAGA_SOURCE") or default_source,
             environ.get("MAGA_OUTPUT_ROOT") or default_output_root]
    return [storage_root(root).split("{", 1)[0] for root in named]


def checked_params(params: Mapping, configured: Iterable[str], data_roots: Iterable[str] | None = None) -> dict:
    """A run's params with what its conf may ask checked: `endpoints` becomes the chosen
    subset of `configured`, `source` and `output_root` the roots the backends use (a
    `file:///abs` root is /abs; another scheme is refused), inside `data_roots` when
    given, each shard to `requeue` a valid shard name. The first refusal is a
    ConfRefused, raised before any request."""
    checked = dict(params)
    checked["endpoints"] = list(choose_endpoints(params.get("endpoints"), configured))
    allowed = None if data_roots is None else list(data_roots)
    for key in ("source", "output_root"):
        try:
            checked[key] = storage_root(params[key])
        except BadStorageURI as error:
            raise ConfRefused(f"run conf: {key}: {error}") from None
        if allowed is not None and not inside_roots(checked[key], allowed):
            raise ConfRefused(
                f"run conf: {key} {_shown_url(checked[key])} is outside the data roots the operator allows"
                " (MAGA_DATA_ROOTS, MAGA_SOURCE, MAGA_OUTPUT_ROOT): refused before any request"
            )
    for shard in params.get("requeue") or ():
        if not is_identifier(shard):
            raise ConfRefused(f"run conf: requeue: {shown(shard)} is not a shard name: refused")
    return checked
