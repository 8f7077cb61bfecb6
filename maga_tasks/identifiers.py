"""The one pattern for identifiers that name paths: recipe ids, recipe names, shard names.

They become folder and file names under the output root (`{root}/{recipe_id}/data/
{shard}.parquet`), so whatever crosses an edge (a CLI argument, a DAG param, a registry
row) is checked here before a path is built from it: letters, digits, '.', '_', '=' and
'-', at most 200 characters, no leading '.' and no '..', so a name never climbs out of
its folder nor hides in it.
"""

from __future__ import annotations

import re

from maga_tasks.errors import EXIT_BAD_INPUT, MagaError

# The same text serves Python's `re` and the DAG params' JSON schema.
IDENTIFIER_PATTERN = r"^(?!\.)(?!.*\.\.)[A-Za-z0-9._=-]{1,200}$"
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)
# How much of a refused value an error shows (repr: control characters escaped).
_SHOWN_CHARS = 60


class IdentifierError(MagaError, ValueError):
    """A recipe id, recipe name or shard name that cannot name a path safely."""

    exit_code = EXIT_BAD_INPUT


def is_identifier(value: object) -> bool:
    return isinstance(value, str) and _IDENTIFIER.fullmatch(value) is not None


def shown(value: object) -> str:
    """A refused value fit for a one-line error: quoted, escaped, cut."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:_SHOWN_CHARS]) + ("..." if len(text) > _SHOWN_CHARS else "")


def check_identifier(value: object, what: str = "identifier") -> str:
    """`value` when it matches `IDENTIFIER_PATTERN`, else IdentifierError naming `what`."""
    if not is_identifier(value):
        raise IdentifierError(
            f"invalid {what} {shown(value)}: want letters, digits, '.', '_', '=' or '-' "
            "(at most 200, no leading '.', no '..')"
        )
    return value
