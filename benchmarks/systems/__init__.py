"""The systems benchmark (``python -m benchmarks.systems``; ``cli`` documents the parts).

``flops``     the pretext step's FLOP/s against the matmul peak
``overhead``  Flower rounds against bare loops of the product's round
``scale``     100 simulated sites: seconds per round and peak memory
``comm``      bytes per site per round, keyed vs whole model
``runs``      ``medfl run`` as a measured subprocess (process-tree memory sampling)
``report``    systems.json / systems.md and the targets
"""
from benchmarks.systems.cli import main, parse_args

__all__ = ["main", "parse_args"]
