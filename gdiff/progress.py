"""Progress bars for every long loop: one place decides who shows them and how.

A bar (tqdm: count, rate and ETA) is shown on process 0 only, and not when the user asked absl for
errors only (`--verbosity=-2` or lower); everywhere else it is None, so loops write
`if bar is not None: bar.update(n)`.
"""

import jax
import tqdm
from absl import logging


def enabled() -> bool:
    """Whether this process shows progress bars."""
    return jax.process_index() == 0 and logging.get_verbosity() >= logging.WARNING


def bar(total: int, *, desc: str, unit: str, initial: int = 0, **kwargs) -> tqdm.tqdm | None:
    """A bar over `total` units starting at `initial` (other tqdm options in `kwargs`, e.g.
    unit_scale=True for bytes), or None where bars are off."""
    if not enabled():
        return None
    return tqdm.tqdm(
        total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, **kwargs
    )
