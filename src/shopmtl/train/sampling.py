"""Which source the next training batch comes from.

A heterogeneous run has sources of very different sizes (23k reviews, 4.5k utterances, millions
of impressions). Three schedules, as in the multi-task NLP literature (Arivazhagan et al. 2019;
Raffel et al., T5, 2020, section 3.5.2):

- ``proportional``: p_i proportional to the source's number of training batches: every example
  is seen about equally often; small sources get few steps.
- ``temperature``: p_i proportional to n_i ** (1 / T). T = 1 is proportional, T -> infinity is
  uniform; T = 2 (square root) up-samples the small sources without drowning the large ones.
- ``round_robin``: the sources in turn, one batch each.

The schedule is a pure function of the sizes and a seed, so a resumed run draws the same
sequence (``SourceSampler.state`` is the step count).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

SamplingMethod = Literal["proportional", "temperature", "round_robin"]
METHODS: tuple[str, ...] = ("proportional", "temperature", "round_robin")
BLOCK = 1024  # draws made at once


def source_probs(sizes: Sequence[int], method: SamplingMethod, temperature: float = 2.0
                 ) -> np.ndarray:
    """The probability of drawing each source at a step (round-robin: its long-run share)."""
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0:
        raise ValueError("need at least one source size")
    if (n <= 0).any():
        raise ValueError(f"every source needs at least one training batch, got sizes {list(sizes)}")
    if method == "proportional":
        w = n
    elif method == "temperature":
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        w = n ** (1.0 / temperature)
    elif method == "round_robin":
        w = np.ones_like(n)
    else:
        raise ValueError(f"unknown sampling method {method!r}; known: {list(METHODS)}")
    return w / w.sum()


class SourceSampler:
    """An endless, seeded sequence of source indices."""

    def __init__(self, sizes: Sequence[int], method: SamplingMethod, temperature: float = 2.0,
                 seed: int = 0) -> None:
        self.probs = source_probs(sizes, method, temperature)
        self.method = method
        self.seed = seed
        self.step = 0
        self._block: tuple[int, np.ndarray] | None = None  # (block index, its 1024 draws)

    def _draws(self, block: int) -> np.ndarray:
        """The draws of steps block * 1024 .. + 1023: step s depends only on (seed, s)."""
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, block])
            self._block = (block, rng.choice(len(self.probs), BLOCK, p=self.probs))
        return self._block[1]

    def schedule(self, steps: int, start: int = 0) -> np.ndarray:
        """The source of steps start .. start + steps - 1 (the same whatever the start)."""
        s = np.arange(start, start + steps)
        if self.method == "round_robin":
            return (s % len(self.probs)).astype(np.int64)
        return np.array([self._draws(i // BLOCK)[i % BLOCK] for i in s], np.int64)

    def next(self) -> int:
        i = int(self.schedule(1, self.step)[0])
        self.step += 1
        return i
