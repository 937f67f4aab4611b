"""Sharded, resumable guided sampling; classifier-scale sweeps; preview grids.

`run.run(config, workdir)` is --mode=sample and `sweep.run(config, workdir)` is --mode=sweep; the
compiled sampler itself is `sampler.Sampler` (one lax.scan, data-parallel over a device mesh).
"""

from gdiff.sampling.labels import format_scale, make_labels, parse_scales
from gdiff.sampling.sampler import (
    Sampler,
    SamplerOptions,
    classifier_guidance,
    sample_chain,
    to_uint8,
)
from gdiff.sampling.shards import read_sample_file, write_sample_file

__all__ = [
    "Sampler",
    "SamplerOptions",
    "classifier_guidance",
    "format_scale",
    "make_labels",
    "parse_scales",
    "read_sample_file",
    "sample_chain",
    "to_uint8",
    "write_sample_file",
]
