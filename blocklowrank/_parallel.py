"""Worker threads over stacks of matrices, with the BLAS held to one thread per worker.

NumPy's LAPACK kernels release the GIL, so a stack of small SVDs split over
threads runs on every core; letting the BLAS thread inside each small call
does not. Used by the SVD kernels and the shared-basis fit.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._params import check

__all__ = ["resolve_n_jobs", "run_chunked"]


# ``n_jobs=None`` splits a stack over threads only when it holds at least this
# much work. Work is counted per matrix as m*n*min(m, n) + 1e4 for the exact
# SVD and m*n*(k + n_oversamples)*(2 n_iter + 2)/16 + 1e4 (n_iter + 1) for the
# randomized one; on the benchmark machine a unit is about 3 ns, so the
# threshold is ~3 ms of single-thread work. Below it the fixed cost of the
# workers (~0.3 ms: the pool and the BLAS limit) eats the gain. Measured by
# benchmarks/bench_engine.py.
_THREAD_MIN_WORK = 1e6
# Chunks handed out per worker: a few, so that a worker slowed down by
# another process does not hold the others back.
_CHUNKS_PER_WORKER = 4
# Chunks hold at most about this many input elements (8 MB of float64), with
# or without threads: the whole-stack outputs of a big stack (all singular
# vectors of every block) cost page faults and cache misses; measured 10-15%
# on one thread for 256 blocks of 256 x 256.
_CHUNK_ELEMS = 1 << 20
_BLAS_CONTROLLER = []  # threadpoolctl controller of the BLAS libraries, made on first use
# Calls running concurrently from several user threads share one BLAS limit:
# the first sets it, the last restores it (else an early exit could restore
# a limit of 1 set by another call, for good).
_BLAS_LIMIT = {"lock": threading.Lock(), "users": 0, "limiter": None}


def _blas_controller():
    """Controller of the BLAS libraries loaded when first needed (numpy's, which
    runs every kernel here), or None when threadpoolctl cannot inspect them."""
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController

            ctl = ThreadpoolController().select(user_api="blas")
        except Exception:
            ctl = None
        _BLAS_CONTROLLER.append(ctl)
    return _BLAS_CONTROLLER[0]


def resolve_n_jobs(n_jobs, n_tasks=None, work=None):
    """Number of worker threads for a stack of ``n_tasks`` matrices.

    An int is used as given; a negative one counts back from the usable
    CPUs as in joblib (-1: all of them). ``None`` is the number of threads
    the BLAS would use anyway (all cores by default, 1 inside
    ``threadpool_limits(1)`` or with ``OMP_NUM_THREADS=1``) when the stack has
    two or more matrices and at least ``_THREAD_MIN_WORK`` of ``work``, and
    1 otherwise (also when ``n_tasks`` is not given). The same cores are
    busy either way; splitting the stack over them is faster than BLAS's
    own threads, which do not speed up many small SVDs.
    """

    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if n_jobs is None:
        if n_tasks is None or n_tasks < 2 or (work is not None and work < _THREAD_MIN_WORK):
            return 1
        ctl = _blas_controller()  # the threads BLAS would use now (honours threadpool_limits)
        blas = [lib.num_threads for lib in ctl.lib_controllers] if ctl is not None else []
        return max(1, min(max(blas, default=1), cpus, int(n_tasks)))
    n_jobs = check(n_jobs, "n_jobs")
    return max(1, cpus + 1 + n_jobs) if n_jobs < 0 else n_jobs


def run_chunked(fn, arrays, n_jobs):
    """Run ``fn(*chunk)`` over chunks of the leading axis in worker threads.

    BLAS is held to one thread per worker so the workers do not oversubscribe
    the cores; NumPy's linalg kernels release the GIL. The stack is cut into
    ``_CHUNKS_PER_WORKER`` chunks per worker (handed out on demand), and
    into chunks of at most about ``_CHUNK_ELEMS`` input elements even on one
    thread; the results are concatenated in order. Each matrix goes through
    the same kernel whatever the chunking.
    """
    N = arrays[0].shape[0]
    n_jobs = max(1, min(n_jobs, N))
    size = N * max(1, int(np.prod(arrays[0].shape[1:])))
    n_chunks = max(1 if n_jobs == 1 else n_jobs * _CHUNKS_PER_WORKER, -(-size // _CHUNK_ELEMS))
    n_chunks = min(N, n_chunks)
    if n_chunks == 1:
        return fn(*arrays)
    bounds = np.linspace(0, N, n_chunks + 1).astype(int)
    chunks = [tuple(a[bounds[t] : bounds[t + 1]] for a in arrays) for t in range(n_chunks)]
    if n_jobs == 1:
        parts = [fn(*c) for c in chunks]
        return tuple(np.concatenate([p[t] for p in parts], axis=0) for t in range(len(parts[0])))
    ctl = _blas_controller()
    lim = _BLAS_LIMIT
    with lim["lock"]:
        if lim["users"] == 0 and ctl is not None:
            lim["limiter"] = ctl.limit(limits=1)
        lim["users"] += 1
    try:
        with ThreadPoolExecutor(max_workers=n_jobs) as ex:
            parts = list(ex.map(lambda c: fn(*c), chunks))
    finally:
        with lim["lock"]:
            lim["users"] -= 1
            if lim["users"] == 0 and lim["limiter"] is not None:
                lim["limiter"].restore_original_limits()
                lim["limiter"] = None
    return tuple(np.concatenate([p[t] for p in parts], axis=0) for t in range(len(parts[0])))
