"""How a trial fails as a result: the solver gave up, or the loss stopped being finite.

The study treats these as outcomes of the experiment (batchnorm inside the block
underflows), so they become one typed exception carrying the cause, epoch and batch.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator


class Diverged(RuntimeError):
    """The run diverged: solver step-size underflow, too many solver steps, a non-finite ODE
    state or a non-finite loss. Nothing else: any other error is a fault of the run, not a result."""

    CAUSES = ("underflow", "max_num_steps", "non_finite_state", "non_finite_loss")

    def __init__(self, cause: str, epoch: int, batch: int | None, detail: str):
        self.cause, self.epoch, self.batch, self.detail = cause, epoch, batch, detail
        where = f"epoch {epoch}" + (f", batch {batch}" if batch is not None else ", validation")
        super().__init__(f"run diverged ({cause}) at {where}: {detail}")

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling them.
        return (Diverged, (self.cause, self.epoch, self.batch, self.detail))


# torchdiffeq 0.2's own assertion messages (torchdiffeq/_impl/rk_common.py), matched from
# their start. A release that rewords them makes tests/test_models.py's real solves fail
# rather than turning every AssertionError into a result.
SOLVER_FAILURES = (
    (re.compile(r"^underflow in dt "), "underflow"),
    (re.compile(r"^max_num_steps exceeded \("), "max_num_steps"),
    (re.compile(r"^non-finite values in state `y`"), "non_finite_state"),
)


@contextlib.contextmanager
def solver_failures(epoch: int, batch: int | None) -> Iterator[None]:
    """torchdiffeq signals a failed solve with a bare AssertionError: turn those it raises for
    a solve that gave up into `Diverged`; any other AssertionError is a bug and stays one."""
    try:
        yield
    except AssertionError as exc:
        message = str(exc)
        for pattern, cause in SOLVER_FAILURES:
            if pattern.match(message):
                raise Diverged(cause, epoch, batch, message) from exc
        raise
