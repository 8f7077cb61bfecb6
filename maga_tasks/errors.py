"""The two kinds of failure the pipeline distinguishes.

Document-level problems (bad JSON, a truncated rewrite, an empty text) never raise: they
become rejected rows with a reason. The exceptions here are shard- or server-level: the
shard (or task) fails and the scheduler's retries take over.
"""


class MagaError(RuntimeError):
    """Base of the errors that end a command with a one-line message."""


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
