"""The two kinds of failure the pipeline distinguishes.

Document-level problems (bad JSON, a truncated rewrite, an empty text) never raise: they
become rejected rows with a reason. The exceptions here are shard- or server-level: the
shard (or task) fails and the scheduler's retries take over.
"""

from maga_tasks.redaction import redact, strip_control


class MagaError(RuntimeError):
    """Base of the errors that end a command with a one-line message.

    The message is redacted and its control characters shown when the error is made:
    it quotes endpoints and server bodies, and goes to stderr, task logs, the registry
    and Airflow's record of the failure, none of which may hold a secret."""

    def __init__(self, *args: object):
        super().__init__(*(strip_control(redact(arg)) if isinstance(arg, str) else arg for arg in args))


class ShardInputError(MagaError):
    """The source shard cannot be read as a corpus shard (format, columns, corruption)."""


class EndpointsUnavailable(MagaError):
    """The LLM fleet cannot serve the run: every endpoint stayed unreachable, or every
    request fails the same way (timeouts, 5xx) with no success anywhere since."""


class FleetRefused(EndpointsUnavailable):
    """Every endpoint refuses the run's requests: wrong API key, a model it does not serve,
    a context length too short for the recipe, or a 4xx for every request of one kind.
    A configuration fault: nothing is rejected, the shard fails and keeps its checkpoint."""


class TokenizerUnavailable(MagaError):
    """A document needs cutting but the served model's tokenizer cannot be loaded."""


class ShardFailedForGood(MagaError):
    """A shard failed `max_shard_failures` tries for reasons of its own: it is `failed`
    for good and leaves the plan until someone requeues it. Retrying will not help."""
