"""One exception hierarchy: every exception of maga_tasks is a MagaError carrying its exit
code and whether a retry can help, and `maga` exits with that code."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import maga_tasks
from maga_tasks.errors import EXIT_BAD_INPUT, EXIT_CONFLICT, EXIT_REFUSED, EXIT_UNAVAILABLE, MagaError
from tests.support.cli import maga, one_error_line

EXIT_CODES = {EXIT_REFUSED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_CONFLICT}

# What each class says, by the name it is defined under. A class missing here, or one
# here that no longer exists, fails `test_every_exception_is_in_the_table`.
EXPECTED = {
    "maga_tasks.errors.MagaError": (EXIT_REFUSED, False),
    "maga_tasks.errors.ShardInputError": (EXIT_BAD_INPUT, False),
    "maga_tasks.errors.EndpointsUnavailable": (EXIT_UNAVAILABLE, True),
    "maga_tasks.errors.FleetRefused": (EXIT_UNAVAILABLE, False),
    "maga_tasks.errors.TokenizerUnavailable": (EXIT_BAD_INPUT, False),
    "maga_tasks.errors.ShardFailedForGood": (EXIT_REFUSED, False),
    "maga_tasks.data.checkpoint.CheckpointMismatch": (EXIT_REFUSED, False),
    "maga_tasks.data.layout.LayoutError": (EXIT_BAD_INPUT, False),
    "maga_tasks.data.storage.StorageError": (EXIT_UNAVAILABLE, True),
    "maga_tasks.data.storage.ObjectNotFound": (EXIT_BAD_INPUT, False),
    "maga_tasks.data.storage.BadStorageURI": (EXIT_BAD_INPUT, False),
    "maga_tasks.engine.budget.BudgetError": (EXIT_BAD_INPUT, False),
    "maga_tasks.engine.planning.PlanningError": (EXIT_BAD_INPUT, False),
    "maga_tasks.engine.token_count.ShardChanged": (EXIT_BAD_INPUT, False),
    "maga_tasks.identifiers.IdentifierError": (EXIT_BAD_INPUT, False),
    "maga_tasks.llm.answer.MalformedAnswer": (EXIT_REFUSED, True),
    "maga_tasks.llm.failure.RequestFailed": (EXIT_REFUSED, False),
    "maga_tasks.llm.requests.Disconnected": (EXIT_REFUSED, True),
    "maga_tasks.llm.vllm_local.VllmError": (EXIT_UNAVAILABLE, False),
    "maga_tasks.quality.frames.QualityError": (EXIT_BAD_INPUT, False),
    "maga_tasks.recipe.RecipeError": (EXIT_BAD_INPUT, False),
    "maga_tasks.registry.errors.RegistryError": (EXIT_BAD_INPUT, False),
    "maga_tasks.registry.errors.RegistryUnavailable": (EXIT_UNAVAILABLE, True),
    "maga_tasks.registry.errors.RegistryNotFound": (EXIT_BAD_INPUT, False),
    "maga_tasks.registry.errors.RegistryConflict": (EXIT_CONFLICT, False),
    "maga_tasks.registry.errors.ShardBusy": (EXIT_CONFLICT, True),
    "maga_tasks.registry.errors.LeaseLost": (EXIT_CONFLICT, True),
    "maga_tasks.registry.reports.ReportNotServed": (EXIT_BAD_INPUT, False),
    "maga_tasks.run_conf.ConfRefused": (EXIT_BAD_INPUT, False),
}


def package_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of maga_tasks, by qualified name
    (each module imported; `__main__` modules would start what they run)."""
    found = {}
    for module_info in pkgutil.walk_packages(maga_tasks.__path__, "maga_tasks."):
        if module_info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_the_walk_finds_exceptions_in_every_layer():
    found = package_exceptions()
    # A walk that missed subpackages would pass the tests below with nothing to check.
    for name in ("maga_tasks.errors.MagaError", "maga_tasks.registry.errors.ShardBusy",
                 "maga_tasks.data.storage.StorageError", "maga_tasks.llm.vllm_local.VllmError"):
        assert name in found


@pytest.mark.parametrize("name, error", sorted(package_exceptions().items()))
def test_every_exception_is_a_maga_error_with_a_code(name, error):
    assert issubclass(error, MagaError), f"{name} sits outside MagaError"
    assert error.exit_code in EXIT_CODES, (name, error.exit_code)
    assert isinstance(error.retryable, bool), name


def test_every_exception_is_in_the_table():
    found = {name: (error.exit_code, error.retryable) for name, error in package_exceptions().items()}
    assert found == EXPECTED


def test_value_errors_stay_value_errors():
    """Callers (pydantic validators among them) catch these as ValueError."""
    from maga_tasks.data.layout import LayoutError
    from maga_tasks.identifiers import IdentifierError
    from maga_tasks.recipe import RecipeError

    for error in (LayoutError, IdentifierError, RecipeError):
        assert issubclass(error, ValueError)


def test_a_message_is_redacted_whatever_the_class():
    from maga_tasks.data.storage import StorageError

    error = StorageError("cannot read s3://bucket/key via http://user:hunter2@minio:9000")
    assert "hunter2" not in str(error)


# -- the exit codes through the real command ---------------------------------------------


def test_bad_input_exits_2(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\nno_such_field: 1\n")
    done = maga("recipe", str(recipe))
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert "no_such_field" in one_error_line(done)

    missing = maga("status", "--registry", str(tmp_path / "absent.sqlite"))
    assert missing.returncode == EXIT_BAD_INPUT, missing.stderr
    one_error_line(missing)
    assert not (tmp_path / "absent.sqlite").exists()
