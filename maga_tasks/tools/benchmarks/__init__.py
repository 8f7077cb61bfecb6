"""The suites of `maga bench` (`engine`, `fleet`, the scale suites) and their figures;
the commands are `tools.bench` and `tools.scale_bench`."""
