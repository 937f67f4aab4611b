"""End-to-end jobs that chain training, sampling and evaluation (`--mode=pipeline`).

`digits.run(config, workdir)` is the embedded default: the whole method on scikit-learn's digits
on a CPU in minutes; `report` turns its measurements into the results table, plot and summary.
"""
