"""Reading a dataset card back as the hub would: its YAML header, its markdown tokens
(markdown-it, a CommonMark parser), its figures, and the rows its configs load."""

from __future__ import annotations

import glob
from pathlib import Path

import yaml

from maga_tasks.engine.card import FIDELITY_FIGURES

# A value that breaks YAML, a front matter, markdown and HTML wherever it lands unescaped.
HOSTILE = (
    "x</script><img src=x onerror=alert(1)>\n---\n# Pwned: [link](javascript:alert(1)) | cell |"
    " ``tick`` ``` ~~~ *em* _u_ &amp; <b>bold</b> api_key=sekret1234 \x1b[31m\u2028...\n- item"
)
# The parts of HOSTILE that may only ever stand inside code (shown, never obeyed).
HOSTILE_MARKS = ("</script>", "<img", "[link]", "<b>", "# Pwned")
# The hub configs a card declares, whatever the values around them.
CONFIGS = [
    {"config_name": name, "data_files": [{"split": "train", "path": f"{folder}/*.parquet"}]}
    for name, folder in (("default", "data"), ("rejected", "rejected"), ("magacorpus", "magacorpus"))
]
# What the card's own prose is allowed to hold: its headings.
HEADINGS = {
    "MAGA corpus {rid}", "How it was made", "Figures so far", "Columns", "Loading",
}


def split_card(text: str) -> tuple[dict, str]:
    """(header, body): the front matter between the first two `---` lines, parsed."""
    assert text.startswith("---\n"), text[:80]
    header, separator, body = text[4:].partition("\n---\n")
    assert separator, "the header is not closed"
    return yaml.safe_load(header), body


def tokens(body: str) -> list:
    """Every markdown token of the body, nested inline ones included."""
    from markdown_it import MarkdownIt

    out = []
    for token in MarkdownIt("commonmark").enable("table").parse(body):
        out.append(token)
        out.extend(token.children or [])
    return out


def assert_values_stay_text(body: str, recipe_id: str) -> str:
    """No HTML, link, image, emphasis or rule anywhere; only the card's own headings; no
    hostile mark outside a code span or block. Returns the text of the code."""
    found = tokens(body)
    kinds = {token.type for token in found}
    assert not kinds & {"html_inline", "html_block", "link_open", "image", "hr", "em_open", "strong_open"}, kinds
    headings = [found[i + 1].content for i, token in enumerate(found) if token.type == "heading_open"]
    expected = {heading.format(rid=recipe_id) for heading in HEADINGS}
    assert set(headings) == expected and len(headings) == len(expected), headings
    prose = " ".join(token.content for token in found if token.type == "text")
    code = " ".join(token.content for token in found if token.type in ("code_inline", "fence"))
    for mark in HOSTILE_MARKS:
        assert mark not in prose, mark
    return code


def figures(body: str) -> dict[str, str]:
    """The `| figure | value |` rows of "Figures so far"."""
    section = body.split("## Figures so far", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {name.strip(): value.strip() for name, value in rows[1:]}


def figures_match(body: str, totals: dict) -> None:
    shown = figures(body)
    for name, key in (
        ("registered shards", "registered_shards"), ("documents", "documents"), ("accepted rows (`data/`)", "accepted"),
        ("rejected rows (`rejected/`)", "rejected"), ("prompt tokens", "prompt_tokens"),
        ("completion tokens", "completion_tokens"), ("source characters", "source_chars"),
        ("accepted output characters", "output_chars"),
    ):
        assert int(shown[name].replace(",", "")) == totals[key], (name, shown[name], totals[key])
    assert float(shown["expansion ratio (output / source characters)"]) == round(totals["expansion_ratio"], 2)
    for name, key in FIDELITY_FIGURES:
        rate = totals[key]
        assert shown[name] == ("not measured" if rate is None else f"{100 * rate:.1f}%"), (name, shown[name], rate)


def config_rows(header: dict, version_root: str | Path) -> dict[str, int]:
    """Rows each config of the header loads: its `data_files` globs resolved against the
    corpus folder and read with pyarrow.dataset."""
    import pyarrow.dataset as ds

    loaded = {}
    for config in header["configs"]:
        files = sorted(f for item in config["data_files"] for f in glob.glob(str(Path(version_root) / item["path"])))
        loaded[config["config_name"]] = ds.dataset(files, format="parquet").count_rows() if files else 0
    return loaded
