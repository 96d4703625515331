"""Seeds derived from tuples of integers (numpy only: the Snakefile imports this at parse time)."""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 32-bit seed from a tuple of integers (numpy SeedSequence: well mixed, reproducible).

    The key count goes first because SeedSequence zero-pads: (s,) and (s, 0) must differ.
    """
    return int(np.random.SeedSequence([len(keys), *map(int, keys)]).generate_state(1)[0])
