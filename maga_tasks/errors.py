"""The two kinds of failure the pipeline distinguishes, and what each exception says to do.

Document-level problems (bad JSON, a truncated rewrite, an empty text) never raise: they
become rejected rows with a reason (`maga_tasks.reject_reasons`). The exceptions here are
shard- or server-level: the shard (or task) fails and the scheduler's retries take over.

Every exception the package defines is a `MagaError` and carries, as class attributes,
the exit code the CLI ends with (`exit_code`) and whether trying again can help
(`retryable`); `tests/unit/test_errors.py` walks the package and holds every class to that.
"""

from typing import ClassVar

from maga_tasks.redaction import redact, strip_control

# The CLI's exit codes (its docstring says when each is used).
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_CONFLICT = 4


class MagaError(RuntimeError):
    """Base of the errors that end a command with a one-line message.

    The message is redacted and its control characters shown when the error is made:
    it quotes endpoints and server bodies, and goes to stderr, task logs, the registry
    and Airflow's record of the failure, none of which may hold a secret.

    `exit_code`: what `maga` exits with; `retryable`: whether the same call made again
    later can succeed without anyone changing anything (a passing fault, a lease that
    runs out), as opposed to input or configuration someone must fix."""

    exit_code: ClassVar[int] = EXIT_REFUSED
    retryable: ClassVar[bool] = False

    def __init__(self, *args: object):
        super().__init__(*(strip_control(redact(arg)) if isinstance(arg, str) else arg for arg in args))


class ShardInputError(MagaError):
    """The source shard cannot be read as a corpus shard (format, columns, corruption)."""

    exit_code = EXIT_BAD_INPUT


class EndpointsUnavailable(MagaError):
    """The LLM fleet cannot serve the run: every endpoint stayed unreachable, or every
    request fails the same way (timeouts, 5xx) with no success anywhere since."""

    exit_code = EXIT_UNAVAILABLE
    retryable = True


class FleetRefused(EndpointsUnavailable):
    """Every endpoint refuses the run's requests: wrong API key, a model it does not serve,
    a context length too short for the recipe, or a 4xx for every request of one kind.
    A configuration fault: nothing is rejected, the shard fails and keeps its checkpoint."""

    retryable = False  # waiting will not fix the key, the model or the context length


class TokenizerUnavailable(MagaError):
    """A document needs cutting but the served model's tokenizer cannot be loaded."""

    exit_code = EXIT_BAD_INPUT


class ShardFailedForGood(MagaError):
    """A shard failed `max_shard_failures` tries for reasons of its own: it is `failed`
    for good and leaves the plan until someone requeues it. Retrying will not help."""

    exit_code = EXIT_REFUSED
