"""One native (BLAS) thread per Python-backend model instance.

Triton scales a CPU step by model instances (``instance_group { count }``), one request per instance
at a time. numpy's and scipy's OpenBLAS start a pool of one thread per core anyway, and after each
multithreaded call those threads spin (``sched_yield``) waiting for the next: on the slabs the
client sends for a 300-slice series, ``preprocess_slab`` cost 3.5 ms of the caller's CPU per slice
and 1.6 ms more on those threads; served, the preprocess stub fell from 10.8 to 3.4 ms per slice
with the cap (bench/RESULTS.md). That is CPU the detector on the same cores lacks. Limited at run time (the stub
has loaded numpy before ``model.py`` runs, so an environment variable set there comes too late).
"""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits


def limit_native_threads(threads: int = 1) -> dict[str, int]:
    """Cap every loaded BLAS library at ``threads``; returns {library file: threads now} for the log."""
    threadpool_limits(limits=threads, user_api="blas")
    return {info["filepath"].rsplit("/", 1)[-1]: int(info["num_threads"]) for info in threadpool_info()
            if info.get("user_api") == "blas"}
