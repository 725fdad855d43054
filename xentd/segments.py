"""The weights of many messages at once: one jitted pass over a layout's concatenated weights.

The daemon's hot path (:mod:`xentd.pipeline`) concatenates the tensors of every
message of one layout in a drain. The scoring kernel checks the prediction and
target values in the pass that scores them (its ``invalid`` output, one flag per
row); weights are not its input, so they are checked here, one segment (message)
at a time, in a single call: finite and non-negative. The result is one flag per
message, so a bad message is set aside alone and its neighbours go on to be
scored. The flag only says *that* a message breaks a rule;
:func:`xentd.validate.validate` then says which rule, with the same words as for
a message checked on its own.

Min and max use the same masked, fast-math reduction as :mod:`xentd.scan` (:func:`xentd.jit.finite_range`).
"""

from __future__ import annotations

import numpy as np

from xentd.jit import cached, finite_range, kernel_array


@cached(error_model="numpy")
def _check_weights(weights, starts, bad):  # type: ignore[no-untyped-def]
    for s in range(bad.shape[0]):
        lo, _, nonfinite = finite_range(weights, starts[s], starts[s + 1])
        bad[s] = 1 if nonfinite > 0 or lo < 0.0 else 0


def check_weights(weights: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """One flag per segment (uint8, 1 = a weight is NaN, Inf or negative) of the float64
    ``weights`` ``starts[s]:starts[s + 1]``."""
    bad = np.zeros(starts.shape[0] - 1, np.uint8)
    _check_weights(kernel_array(weights), kernel_array(starts.astype(np.int64, copy=False)), bad)
    return bad


def warmup() -> None:
    """Compile the one signature :func:`check_weights` is called with."""
    check_weights(np.ones(2), np.array([0, 1, 2], np.int64))
