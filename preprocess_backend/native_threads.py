"""One native (BLAS) thread per Python-backend model instance.

Triton scales a CPU step by model instances (``instance_group { count }``), one request per instance
at a time. numpy's and scipy's OpenBLAS start a pool of one thread per core anyway, and after each
multithreaded call those threads spin (``sched_yield``) waiting for the next: measured in the
preprocess stub on a served 300-slice series, 1.6 ms of CPU per slice beside 3.5 ms of real work
(bench/RESULTS.md), CPU the detector on the same cores then lacks. Limited at run time (the stub
has loaded numpy before ``model.py`` runs, so an environment variable set there comes too late).
"""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits


def limit_native_threads(threads: int = 1) -> dict[str, int]:
    """Cap every loaded BLAS library at ``threads``; returns {library file: threads now} for the log."""
    threadpool_limits(limits=threads, user_api="blas")
    return {info["filepath"].rsplit("/", 1)[-1]: int(info["num_threads"]) for info in threadpool_info()
            if info.get("user_api") == "blas"}
