"""Beta schedules and timestep respacing (the reference's `get_named_beta_schedule` and
`respace.space_timesteps`).

Everything here is float64 numpy, computed exactly as the reference does, because respaced betas
are derived from ratios of cumulative products and small differences compound over 1000 steps.
"""

import math
from collections.abc import Callable, Iterable

import numpy as np


class UnknownScheduleError(ValueError, NotImplementedError):
    """An unknown schedule name. A ValueError; also a NotImplementedError like the reference's."""


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretises a continuous alpha_bar(t), t in [0, 1], into `num_diffusion_timesteps` betas.

    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta); max_beta < 1 keeps the
    last step away from the singularity at alpha_bar(1) = 0.

    Returns:
      float64 array [T].
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def _cosine_alpha_bar(t: float) -> float:
    # Nichol & Dhariwal (2021), eq. 17 with s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The betas of a named schedule ("linear" or "cosine") for T steps, float64 [T].

    "linear" is Ho et al.'s 1e-4..0.02 line, scaled by 1000 / T so that other chain lengths keep a
    similar total amount of noise; "cosine" is the improved-DDPM schedule.
    """
    if not isinstance(num_diffusion_timesteps, int | np.integer) or num_diffusion_timesteps < 1:
        raise ValueError(
            f"num_diffusion_timesteps must be a positive integer, got {num_diffusion_timesteps!r}"
        )
    num_diffusion_timesteps = int(num_diffusion_timesteps)
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar)
    raise UnknownScheduleError(
        f"unknown beta schedule: {schedule_name!r} (expected 'linear' or 'cosine')"
    )


def _parse_section_counts(section_counts: str) -> list[int]:
    try:
        return [int(x) for x in section_counts.split(",")]
    except ValueError:
        raise ValueError(
            f"cannot parse timestep respacing {section_counts!r}: expected comma-separated "
            "integers such as '250' or '10,15,20', or 'ddimN'"
        ) from None


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> set[int]:
    """Which steps of a T-step chain a respaced chain keeps (the reference's respacing rule).

    The chain is cut into len(section_counts) nearly equal sections (the first T % n sections are
    one step longer); section i keeps section_counts[i] steps at a fractional stride
    (size - 1) / (count - 1), accumulated step by step in floating point and rounded half to even
    (Python's `round`), exactly as the reference does, so e.g. "25" and "27" pick the same steps.
    "ddimN" instead picks range(0, T, s) for the smallest integer stride s that gives N steps.

    Args:
      num_timesteps: T of the original chain.
      section_counts: "250", "10,15,20", "ddim50", or a sequence of ints.
    Returns:
      a set of original step indices.
    Raises:
      ValueError for an unparsable string, a negative count, a section with fewer steps than
      requested, or a ddim count no integer stride can produce.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired_count = int(section_counts[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"cannot parse timestep respacing {section_counts!r}: expected 'ddimN' with "
                    "an integer N"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired_count} steps from {num_timesteps} with an "
                "integer stride"
            )
        counts = _parse_section_counts(section_counts)
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("timestep respacing needs at least one section count")
    if any(c < 0 for c in counts):
        raise ValueError(f"section counts must be non-negative, got {counts}")

    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulating (instead of multiplying i * stride) is part of the reference's behaviour:
        # the float error decides some half-way roundings.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)
