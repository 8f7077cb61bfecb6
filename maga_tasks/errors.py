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
    """Every LLM endpoint stayed unreachable longer than the configured timeout."""


class TokenizerUnavailable(MagaError):
    """A document needs cutting but the served model's tokenizer cannot be loaded."""
