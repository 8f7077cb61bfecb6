"""What a benchmark reports: figures as the median of repeated runs with min and max,
their markdown tables and the report files."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


@dataclass
class Figure:
    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        if not self.values:
            return {"median": None, "min": None, "max": None, "runs": 0, "unit": self.unit}
        return {
            "median": round(statistics.median(self.values), 4),
            "min": round(min(self.values), 4),
            "max": round(max(self.values), 4),
            "runs": len(self.values),
            "unit": self.unit,
        }


class Figures:
    def __init__(self):
        self._figures: dict[str, Figure] = {}

    def add(self, name: str, value: float | None, unit: str = "") -> None:
        figure = self._figures.setdefault(name, Figure(name, unit))
        if value is not None:
            figure.values.append(float(value))

    def as_dict(self) -> dict:
        return {name: figure.summary() for name, figure in self._figures.items()}


def markdown_table(title: str, figures: dict) -> str:
    lines = [f"### {title}", "", "| figure | median | min | max | runs |", "|---|---:|---:|---:|---:|"]
    for name, s in figures.items():
        if s["runs"]:
            unit = f" ({s['unit']})" if s["unit"] else ""
            lines.append(f"| {name}{unit} | {s['median']:,.3f} | {s['min']:,.3f} | {s['max']:,.3f} | {s['runs']} |")
        else:
            lines.append(f"| {name} | n/a | | | 0 |")
    return "\n".join(lines)


def percentile(values: list[float], share: float) -> float | None:
    """The value at `share` of the sorted values (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def write_report(out: Path, name: str, report: dict, tables: list[str]) -> dict:
    """`{name}.json` and `{name}.md` (the tables) under `out`; the tables on stderr too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text("\n\n".join(tables) + "\n")
    sys.stderr.write("\n\n".join(tables) + "\n")
    report["files"] = [str(out / f"{name}.json"), str(out / f"{name}.md")]
    return report
