"""Data-quality gates on shards, run with great_expectations 1.x inside our own code.

`gates` holds the two entry points, `validate_input` and `validate_output`; `suites`
the expectations built from the recipe's thresholds; `datadocs` running GX and
publishing its Data Docs; `frames` reading committed and source shards into the frames
GX measures; `labels` the genre/audience summary of accepted rows.

great_expectations is imported only when a gate runs: an Airflow DAG file that imports
this package still parses in milliseconds.
"""

from maga_tasks.quality.frames import DEFAULT_COLUMNS, CommittedShard, load_committed, read_source_frame
from maga_tasks.quality.gates import QualityError, QualityReport, validate_input, validate_output
from maga_tasks.quality.labels import label_summary, short_label

__all__ = [
    "DEFAULT_COLUMNS",
    "CommittedShard",
    "QualityError",
    "QualityReport",
    "label_summary",
    "load_committed",
    "read_source_frame",
    "short_label",
    "validate_input",
    "validate_output",
]
