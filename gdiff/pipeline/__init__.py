"""End-to-end jobs that chain training, sampling and evaluation (`--mode=pipeline`).

`digits.run(config, workdir)` is the embedded default: the whole method on scikit-learn's digits
on a CPU in minutes, a class-conditional and an unconditional model guided by one classifier,
scored and reported by the same engine as `--mode=sweep` (`gdiff.evaluation.scoring`,
`gdiff.evaluation.report`).
"""
