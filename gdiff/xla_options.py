"""XLA compile options of gdiff's sampling and training programs, per backend.

CPU: `xla_cpu_experimental_ynn_fusion_type=""` turns XLA:CPU's YNNPACK convolution fusions off, so
convolutions run on XLA's own kernels, which are faster for these networks on the 2-core AMD EPYC
CPU this project runs on (benchmarks/RESULTS.md, "CPU sampling"): a 3x3 convolution of
[4, 64, 64, 64] took 6.7 ms instead of 11.5 ms, guided DDIM sampling of the reference's CPU
configuration 0.126-0.127 instead of 0.148 s per image-step (`benchmarks/bench_sampling.py
--config cpu --guided --dtype float32 --repeats 3`), and one tiny training step 55 instead of
70 ms (`benchmarks/bench_training.py --kind diffusion --tiny --dtype float32 --steps 10`, the
option given through XLA_FLAGS). Other backends get no options.

The options are passed per program (`jax.jit(..., compiler_options=...)`), not through
XLA_FLAGS, so they touch nothing else a process compiles (the evaluator's Inception network keeps
XLA's defaults). An option this jaxlib does not know is dropped with one warning (probed once), so
another jax version runs, only without it.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from absl import logging

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _supported(backend: str) -> dict[str, str]:
    if backend != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.float32(0)).compile()
    except Exception as e:  # noqa: BLE001 - any refusal means: compile without them
        logging.warning(
            "XLA options %s not supported here (%s); using XLA's defaults", CPU_OPTIONS, e
        )
        return {}
    return dict(CPU_OPTIONS)


def compiler_options() -> dict[str, str] | None:
    """The options for `jax.jit(..., compiler_options=...)` on the default backend, or None."""
    return _supported(jax.default_backend()) or None
