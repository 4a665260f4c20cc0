"""OmniQ's benchmark: throughput and latency of every backend, against the engine's floor and peers.

Run ``python -m benchmarks`` (``--quick`` for a short pass); see ``docs/performance.md``.
"""
