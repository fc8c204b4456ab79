"""How a trial fails as a result: the solver gave up, or the loss stopped being finite.

The study treats these as outcomes of the experiment (batchnorm inside the block
underflows), so they become one typed exception carrying the cause, epoch and batch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class Diverged(RuntimeError):
    """The run diverged: solver step-size underflow, too many solver steps, or a non-finite loss."""

    CAUSES = ("underflow", "max_num_steps", "non_finite_loss", "solver_error")

    def __init__(self, cause: str, epoch: int, batch: int | None, detail: str):
        self.cause, self.epoch, self.batch, self.detail = cause, epoch, batch, detail
        where = f"epoch {epoch}" + (f", batch {batch}" if batch is not None else ", validation")
        super().__init__(f"run diverged ({cause}) at {where}: {detail}")

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling them.
        return (Diverged, (self.cause, self.epoch, self.batch, self.detail))


@contextlib.contextmanager
def solver_failures(epoch: int, batch: int | None) -> Iterator[None]:
    """torchdiffeq signals a failed solve with a bare AssertionError: turn it into `Diverged`."""
    try:
        yield
    except AssertionError as exc:
        message = str(exc)
        if "underflow in dt" in message:
            cause = "underflow"
        elif "max_num_steps exceeded" in message:
            cause = "max_num_steps"
        else:
            cause = "solver_error"
        raise Diverged(cause, epoch, batch, message or repr(exc)) from exc
