"""Peak extra memory of one loss call (forward, backward, forward+backward).

CUDA (:class:`CudaPeaks`, read during the timed calls themselves):
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated
just before the phase (inputs, and for ``bwd`` the state saved by the forward, are not counted;
the gradient and the loss are).

CPU: torch's CPU allocator has no peak counter, and much of what an op allocates (MKL / oneDNN
workspaces, a C++ kernel's scratch) never passes through it, so we measure the operating system's
view instead, in a fresh worker process (``python benchmarks/memory.py JOBS_JSON``):

1. the worker is started with ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0``
   so glibc serves every block >= 64 KiB with its own ``mmap`` and returns it to the kernel on
   ``free`` (no allocator caching hides or inflates a peak);
2. it builds the inputs and runs the call once untimed (lazy library initialisation, thread
   pools, MKL buffers, ``torch.compile``), then ``gc.collect()`` and ``malloc_trim(0)``;
3. it reads ``VmRSS`` from ``/proc/self/status`` (baseline), writes ``5`` to
   ``/proc/self/clear_refs`` (resets the high-water mark ``VmHWM`` to the current RSS), runs the
   forward, reads ``VmHWM``; then resets again, runs the backward, reads ``VmHWM``.

``peak = VmHWM - baseline`` counts every page the call touched at its peak: the loss, the saved
state, the gradient, every temporary. It is exact to a page (4 KiB) plus a little noise from
other threads of the process; pages that are allocated but never touched do not count (nor do
they cost memory). ``gemm`` (whose only allocation is the N x N fp32 output) is measured the same
way as a sanity check: it reads ``N^2 * 4`` bytes.

The worker runs the jobs given to it one after another (one implementation, increasing sizes);
each job has its own warm-up, trim and baseline. It imports the same ``mcsc`` as the process that
starts it, and reports which one it imported.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import site
import subprocess
import sys
import time

MIB = float(1 << 20)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def meminfo_bytes(field: str) -> float:
    """A field of /proc/meminfo ("MemTotal", "MemAvailable") in bytes; inf where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_cpu_in_process(run_forward, run_backward, single: str | None = None) -> dict:
    """Peak extra MiB of each phase; the caller has already warmed the call up."""
    _trim()
    base = _status_kib("VmRSS")
    _reset_peak()
    out = run_forward()
    fwd_hwm = _status_kib("VmHWM")
    result = {single or "fwd": (fwd_hwm - base) * 1024 / MIB}
    if single:
        del out
        return result
    after_fwd = _status_kib("VmRSS")
    _reset_peak()
    run_backward(out)
    bwd_hwm = _status_kib("VmHWM")
    result["bwd"] = (bwd_hwm - after_fwd) * 1024 / MIB
    result["fwd+bwd"] = (max(fwd_hwm, bwd_hwm) - base) * 1024 / MIB
    del out
    return result


class CudaPeaks:
    """Peak extra CUDA memory (MiB) of the phases of one call, measured around the call itself.

    Create it just before the call (after synchronising); call :meth:`end` with the phase's
    mode after each phase has synchronised. One phase gives that mode alone; two phases (``fwd``
    then ``bwd``) also give ``fwd+bwd``, the highest point of both over the memory before the
    call.
    """

    def __init__(self):
        import torch

        self._cuda = torch.cuda
        self._base = self._phase_start = self._cuda.memory_allocated()
        self._highest = self._base
        self.peaks: dict[str, float] = {}
        self._cuda.reset_peak_memory_stats()

    def end(self, mode: str) -> None:
        peak = self._cuda.max_memory_allocated()
        self.peaks[mode] = (peak - self._phase_start) / MIB
        self._highest = max(self._highest, peak)
        if len(self.peaks) == 2:
            self.peaks["fwd+bwd"] = (self._highest - self._base) / MIB
        self._phase_start = self._cuda.memory_allocated()
        self._cuda.reset_peak_memory_stats()


def make_phase_functions(impl: str, z, y, bounds, temperature, weighting, blockwise: bool = False):
    """(run_forward, run_backward, single_phase) closures for one implementation;
    ``single_phase`` names the mode of a call measured as one phase ("fwd" for gemm)."""
    import implementations as impls

    if impl == "gemm":
        return (lambda: impls.gemm(z, bounds)), None, "fwd"
    if blockwise:  # forward and backward interleave: one phase, reported as fwd+bwd

        def run_all():
            z.grad = None
            impls.blockwise_fwd_bwd(impl, z, y, bounds, temperature, weighting)

        return run_all, None, "fwd+bwd"
    fn = impls.IMPLEMENTATIONS[impl]

    def run_forward():
        z.grad = None
        return fn(z, y, bounds, temperature, weighting)

    def run_backward(loss):
        loss.backward()

    return run_forward, run_backward, None


def run_job(job: dict) -> dict:
    """Build the inputs of one job, warm up, measure (CPU)."""
    import implementations as impls
    import torch

    dtype = getattr(torch, job["dtype"])
    sizes = job["sizes"]
    bounds = impls.segment_bounds(sizes)
    z, y = impls.make_inputs(sum(sizes), job["D"], job["C"], dtype=dtype, seed=job.get("seed", 0))
    z.requires_grad_(True)
    blockwise = job.get("blockwise", False)
    run_forward, run_backward, single = make_phase_functions(
        job["impl"], z, y, bounds, job["temperature"], job["weighting"], blockwise
    )
    if len(bounds) > 3:  # warm up on the first blocks (and the last, odd-sized one)
        sizes = impls.warmup_sizes(sizes)
        wz, wy = impls.make_inputs(sum(sizes), job["D"], job["C"], dtype=dtype, seed=1)
        wz.requires_grad_(True)
        warm_fwd, warm_bwd, _ = make_phase_functions(
            job["impl"],
            wz,
            wy,
            impls.segment_bounds(sizes),
            job["temperature"],
            job["weighting"],
            blockwise,
        )
    else:
        warm_fwd, warm_bwd = run_forward, run_backward
    warm = warm_fwd()
    if not single:
        warm_bwd(warm)
    del warm
    z.grad = None
    if len(bounds) > 3:
        del wz, wy, warm_fwd, warm_bwd
    return measure_cpu_in_process(run_forward, run_backward, single)


def child_pythonpath(package_parent: str) -> str:
    """PYTHONPATH for a worker that must import the ``mcsc`` found in ``package_parent``: this
    folder (for ``implementations``), then ``package_parent`` unless it is a site directory the
    worker searches anyway, then the caller's PYTHONPATH."""
    here = os.path.dirname(os.path.abspath(__file__))
    site_dirs = set(site.getsitepackages()) | {site.getusersitepackages()}
    paths = [here] + ([package_parent] if package_parent not in site_dirs else [])
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(paths)


def measure_cpu_jobs(
    jobs: list[dict], package_parent: str, timeout: float = 1800.0, script: str | None = None
) -> list[dict]:
    """Run ``jobs`` in one fresh worker process that imports the ``mcsc`` package found in
    ``package_parent``; returns one dict (or {"error": ...}) per job, each with the ``package``
    directory and ``backend`` the worker ran (an error when that is not
    ``package_parent/mcsc``). ``script``: the worker (default this file); it takes the jobs as
    JSON in its first argument and prints one ``MEMJSON`` line per job."""
    env = dict(os.environ)
    env.update(MALLOC_ENV)
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = child_pythonpath(package_parent)
    try:
        proc = subprocess.run(
            [sys.executable, script or os.path.abspath(__file__), json.dumps(jobs)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return [{"error": "memory worker timed out"} for _ in jobs]
    results = []
    expected = os.path.join(package_parent, "mcsc")
    for line in proc.stdout.splitlines():
        if line.startswith("MEMJSON "):
            result = json.loads(line[len("MEMJSON ") :])
            if "error" not in result and result["package"] != expected:
                result = {"error": f"the memory worker imported mcsc from {result['package']}"}
            results.append(result)
    if len(results) < len(jobs):
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        results += [
            {"error": f"memory worker failed: {tail[0]}"} for _ in range(len(jobs) - len(results))
        ]
    return results


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def serve_jobs(jobs: list[dict], run=None, error_text=_error_text, trim_between_jobs=True) -> None:
    """The worker's loop: ``run(job) -> {mode: MiB}`` (default :func:`run_job`) for every job,
    printed as one ``MEMJSON`` line each with the seconds it took and the ``package`` and
    ``backend`` imported; a job that raises gives ``{"error": error_text(error)}`` and the next
    job runs. ``trim_between_jobs``: collect garbage and trim the heap after every job."""
    import torch

    import mcsc

    run = run or run_job
    torch.set_num_threads(jobs[0].get("threads", torch.get_num_threads()))
    imported = {
        "package": os.path.dirname(os.path.abspath(mcsc.__file__)),
        "backend": mcsc.backend("cpu"),
    }
    for job in jobs:
        started = time.perf_counter()
        try:
            result = run(job)
        except Exception as error:  # report, keep going with the next job
            result = {"error": error_text(error)}
        result["seconds"] = time.perf_counter() - started
        result.update(imported)
        if trim_between_jobs:
            _trim()
        print("MEMJSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    serve_jobs(json.loads(sys.argv[1]))
