"""Guided sampling as a library: the compiled sampler, the plan of a run, labels, files, grids.

The compiled sampler is `sampler.Sampler` (one lax.scan, data-parallel over a device mesh), built
from config groups by `sampler.build_sampler`; `plan.make_plan` decides what a run draws. The
runs themselves (--mode=sample, --mode=sweep) are jobs: gdiff/jobs/sample.py, gdiff/jobs/sweep.py.
"""

from gdiff.sampling.labels import format_scale, make_labels, parse_scales
from gdiff.sampling.sample_files import read_sample_file, write_sample_file
from gdiff.sampling.sampler import (
    DpmSolverOptions,
    Sampler,
    SamplerOptions,
    classifier_guidance,
    dpm_solver_chain,
    sample_chain,
    to_uint8,
)

__all__ = [
    "DpmSolverOptions",
    "Sampler",
    "SamplerOptions",
    "classifier_guidance",
    "dpm_solver_chain",
    "format_scale",
    "make_labels",
    "parse_scales",
    "read_sample_file",
    "sample_chain",
    "to_uint8",
    "write_sample_file",
]
