"""Placements the engine tests run under (Policy keyword arguments): every weight, cache and
activation tier combination the schedule distinguishes."""

PLACEMENTS = {
    "compute": dict(),
    "host-ccc": dict(w_gpu_percent=0, w_cpu_percent=100, cache_gpu_percent=0, cache_cpu_percent=100,
                     act_gpu_percent=0, act_cpu_percent=100, cpu_cache_compute=True),
    "disk": dict(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0),
    "mixed": dict(w_gpu_percent=30, w_cpu_percent=40, cache_gpu_percent=30, cache_cpu_percent=40),
}
