"""MAGA corpus expansion: genre/audience reformulation of pretraining shards with vLLM.

The library does the work and knows nothing of Airflow; `dags/` wires it into tasks.
"""

__version__ = "0.1.0"
