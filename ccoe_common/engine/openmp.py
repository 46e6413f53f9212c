"""Hand a thread's idle OpenMP workers back, so the thread that steps the model stays fast.

PyTorch's CPU kernels run on GNU OpenMP (libgomp). Every thread that runs a parallel kernel
gets a pool of worker threads of its own, and the pools live as long as their thread. Once
the workers of all pools outnumber the CPUs, libgomp stops busy-waiting between parallel
regions (100 spins instead of 300,000) and parks its workers on a futex instead, so each of
the ~150 matmuls of a decode step waits for a worker to wake up. Measured on 2 cores with the
150m benchmark shape, one-row decode step:

- only one thread has ever run torch work: 34 ms;
- the engine thread stepping while the thread that loaded the model still holds its pool
  (any Python program that loads a model and then serves from another thread): 53 ms;
- the same after the loading thread released its pool (`release_openmp_workers`): 33 ms.

So the engine releases the pool of the thread that starts it and of threads that push
experts, and its own pool whenever it goes idle; benchmarks release the main thread's pool
after each system that ran there. Releasing is cheap: the next parallel kernel on that
thread re-creates its workers (one `pthread_create` each).

`omp_pause_resource_all` is standard OpenMP 5.0; where the runtime torch uses lacks it, the
function does nothing.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep the runtime initialised


@cache
def _pause_function() -> Any | None:
    # The runtime torch loaded is already in the process: look the symbol up there first,
    # then in the libgomp that torch's Linux wheels ship in torch/lib.
    try:
        return ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError):
        pass
    import torch

    for lib in sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*")):
        try:
            return ctypes.CDLL(str(lib)).omp_pause_resource_all
        except (AttributeError, OSError):
            continue
    log.debug("no omp_pause_resource_all in this process; OpenMP pools are left alone")
    return None


def release_openmp_workers() -> bool:
    """Free the OpenMP worker threads of the calling thread; True if they were freed.

    Safe to call at any time outside a parallel region: torch re-creates the workers when
    this thread next runs a parallel kernel. False where the runtime has no such call.
    """
    pause = _pause_function()
    if pause is None:
        return False
    return int(pause(OMP_PAUSE_SOFT)) == 0
