"""What only a whole, short-lived process may set: Python's cyclic garbage collector.

``rnnjax`` (:func:`rnnjax.cli.run`) and the tuner's children (``python -m rnnjax.measure``)
import JAX, build a few programs, run them and exit. Each collection the imports set off
scans every object made so far (JAX's modules make hundreds of thousands, alive until the
process ends), and so do the interpreter's last collections at exit. So the collector is
off while the process imports, those objects are then frozen out of every later collection
(``gc.freeze``) with the collector on again for what the run makes (``rnnjax train``: once
it is tuned, a first run's tuning spent waiting on its children), and everything is
frozen at the end. Measured on the seed run, six whole processes each way in turns: the
time outside the training loop 1.08-1.52 s (median 1.27) against 1.56-2.10 (1.71), about
0.15 s of it the imports and 0.3 s the exit.

Never from a library call: a process that goes on after it would keep what was garbage
at the freeze for good.
"""

from __future__ import annotations

import gc


def importing() -> None:
    """At the process's start: no collections while it imports."""
    gc.disable()


def imported() -> None:
    """The process has imported what it runs on: what exists now leaves the collector's
    view for good, and the collector is on again."""
    gc.freeze()
    gc.enable()


def exiting() -> None:
    """The process is about to exit: nothing for the interpreter's last collections."""
    gc.freeze()
