"""Why an LLM request failed, as fields: the client fills a `RequestFailure` where the
failure happens and every reader (the retry loop, the stages, the stats) reads its fields
instead of parsing a string back.

`reason` is the one string form: what a rejected row stores after its stage's prefix
(`rewrite_request_http_400`, `pairs_request_retries_exhausted`) and what the client's
failure counters are keyed by (`retryable_timeout`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from maga_tasks.errors import MagaError

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
# The endpoint's configuration, not the request: wrong key, forbidden, unknown model.
REFUSAL_STATUS = {401: "refused the API key", 403: "forbids the requests", 404: "does not serve the model"}
_STRUCTURED_OUTPUT_WORDS = ("response_format", "json_schema", "guided", "structured")


def is_redirect(status: int) -> bool:
    return 300 <= status < 400


@dataclass(frozen=True)
class RequestFailure:
    """One failed attempt, or a request failed for good.

    `cause` names it without the `retryable_` mark: `timeout`, `connection_error`,
    `client_error`, `bad_response`, `disconnected`, `http_<status>`, and for a request
    failed for good `retries_exhausted` or `endpoint_died`."""

    cause: str
    detail: str = ""
    status: int = 0  # the HTTP status when the server answered one, else 0
    retryable: bool = False  # the attempt may be retried (a passing fault, not the request's)
    retry_after: float | None = None  # seconds the server asked us to wait
    # Tokens of failed attempts that still cost the server (their usage was valid).
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def reason(self) -> str:
        """The failure as rows and counters name it: `http_400`, `retryable_timeout`."""
        return f"retryable_{self.cause}" if self.retryable else self.cause

    @property
    def client_error(self) -> bool:
        """A 4xx other than 429: the server read the request and refused it."""
        return 400 <= self.status < 500 and self.status != 429

    @property
    def refuses_endpoint(self) -> bool:
        """The endpoint's configuration refuses every request (key, model, redirect)."""
        return self.status in REFUSAL_STATUS or is_redirect(self.status)

    @property
    def refuses_structured_outputs(self) -> bool:
        """A 4xx that says the server cannot do `response_format` (the caller falls back)."""
        text = self.detail.lower()
        return self.status in (400, 422, 501) and not self.retryable and any(
            word in text for word in _STRUCTURED_OUTPUT_WORDS
        )

    def costing(self, prompt_tokens: int, completion_tokens: int) -> RequestFailure:
        """The same failure carrying the tokens its request's attempts cost."""
        return dataclasses.replace(self, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


class RequestFailed(MagaError):
    """A request could not be answered; `failure` says why. Raised to a stage for good
    (the caller rejects its document) and inside the client for one attempt. Not
    retryable as an error: the client has spent the request's budget of attempts."""

    def __init__(self, failure: RequestFailure):
        super().__init__(f"{failure.reason}: {failure.detail}" if failure.detail else failure.reason)
        self.failure = failure
