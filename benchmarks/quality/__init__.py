"""The quality benchmark (``python -m benchmarks.quality``; ``cli`` documents the methods).

``experiment``  presets, data, pretrainings (the product's round and aggregation), rows
``summary``     statistics over seeds, targets, the Markdown report
``plan``        the work a run takes, before running it
``cli``         the command line: run the rows (resumable), write the results
"""
from benchmarks.quality.cli import main, parse_args
from benchmarks.quality.experiment import METHODS, PRESETS, Experiment, Preset, append_row, read_rows

__all__ = ["METHODS", "PRESETS", "Experiment", "Preset", "append_row", "main", "parse_args", "read_rows"]
