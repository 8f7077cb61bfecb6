"""The one redaction every outgoing text passes: errors, log lines, registry rows, XComs, pages.

Secrets reach us in three shapes, and each has its rule:
- user-info in a URL (`https://user:password@host`, `postgresql://maga:pw@db/x`): the
  user-info is replaced, host and path stay (an operator needs to know which host);
- credentials in a header or a query (`Authorization: Bearer ...`, `api_key=...`,
  `password=...`), as a server may echo them back in an error body;
- the configured secrets themselves (the API key, the S3 secret, connection passwords),
  wherever they stand, since a proxy may quote them in any form.

Texts stored or shown are also cut to a bound and stripped of NUL and control characters
(PostgreSQL refuses NUL in text; a terminal obeys escape sequences), by `clean_text`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

MASK = "***"

# Environment variables whose values are secrets wherever they appear.
SECRET_ENVIRONMENT = (
    "MAGA_API_KEY",
    "VLLM_API_KEY",
    "OPENAI_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "PGPASSWORD",
)
# A secret shorter than this is not searched for as a plain string: "x" or "1" would mask
# half of every message, and a key that short protects nothing anyway.
MIN_SECRET_LENGTH = 6

_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"<>]+)@")
_BEARER = re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=\-]{4,}")
_AUTH_HEADER = re.compile(r"(?i)\b(authorization|x-api-key|api-key|proxy-authorization)(\"?\s*[:=]\s*\"?)[^\r\n\",}]+")
_CREDENTIAL_PAIR = re.compile(
    r"(?i)\b(api[_-]?key|access[_-]?token|secret[_-]?access[_-]?key|secret|password|passwd|pwd|token)"
    r"(\"?\s*[:=]\s*\"?)(?!\*\*\*)[^\s&\",;}']+"
)
# Control characters but tab and newline; NUL among them.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask `value` wherever it appears from now on (a key read from a connection, say)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _registered.add(value)


def known_secrets() -> set[str]:
    found = {os.environ.get(name) for name in SECRET_ENVIRONMENT}
    return {value for value in found if value and len(value) >= MIN_SECRET_LENGTH} | _registered


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL user-info, credential headers and pairs, and known secrets masked."""
    if not text:
        return text
    # Longest first, so a secret that contains another is masked whole.
    for secret in sorted(known_secrets().union(s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH),
                         key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
    return _CREDENTIAL_PAIR.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)


def strip_control(text: str) -> str:
    """`text` with NUL and control characters (escape sequences among them) shown, not kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def clean_text(text: object, limit: int = 2000) -> str:
    """What may be stored or shown of an untrusted or secret-bearing text: redacted, without
    control characters, at most `limit` characters (cut with a marker saying how much)."""
    value = strip_control(redact(str(text)))
    if len(value) > limit:
        value = f"{value[:limit]}... [{len(value) - limit} more characters cut]"
    return value


def redact_url(url: str) -> str:
    """An endpoint or storage URL fit to print: its user-info masked."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", url)


class RedactingFilter(logging.Filter):
    """Masks secrets in every record a handler emits (message, arguments and traceback),
    and shows control characters of the message rather than passing them to a terminal
    (a file name may carry escape sequences)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = strip_control(redact(message))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach the filter to every handler of `logger` (the root logger by default), once."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
