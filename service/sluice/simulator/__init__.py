"""The embedded simulated upstream: a fake OpenAI-compatible model with injectable faults.

The default backend of ``sluice serve``, the upstream of the tests and of
the benchmarks. ``behaviour`` is sans-IO (the scheme, the text, the chunk
bytes); ``server`` is the lean socket server. See docs/simulator.md.
"""

from .behaviour import Behaviour, SimParamError, SimulatorLimits, iter_tokens, parse_behaviour, simulated_tokens
from .server import Simulator, SimulatorStats, serve_simulator

__all__ = [
    "Behaviour",
    "SimParamError",
    "Simulator",
    "SimulatorLimits",
    "SimulatorStats",
    "iter_tokens",
    "parse_behaviour",
    "serve_simulator",
    "simulated_tokens",
]
