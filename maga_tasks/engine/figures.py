"""Moved to `maga_tasks.data.figures` (a shard's figures sit below the engine, beside the
files they are read from); these names stay importable from here for the tools."""

from maga_tasks.data.figures import FIGURE_COLUMNS, FigureTally, ShardFigures, figures_of_files

__all__ = ["FIGURE_COLUMNS", "FigureTally", "ShardFigures", "figures_of_files"]
