"""The erase lab: the miniature world's training, its gates, the benchmarks and the BENCHMARKS.md writer, and the
bad-input table. It sits beside the `erase` library and is not shipped in its wheel; run its commands from a
checkout as `python -m erase_lab.<module>` (docs/lab.md lists them)."""
