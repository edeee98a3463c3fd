"""The embedded simulated upstream: a fake model server with injectable faults, speaking every API the gateway relays.

The default backend of ``sluice serve``, the upstream of the tests and of
the benchmarks. Sans-IO: ``behaviour`` (the scheme, the text, the limits),
``grammar`` (what every API shares) and one module per API grammar
(``chat``, ``completions``, ``responses``, ``messages``, ``embeddings``);
``server`` is the lean socket server, one token loop for every API. See
docs/simulator.md.
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
