"""commlmo: communication-efficient distributed training with Muon-family (LMO) optimizers.

An optimizer is a config: per parameter group, an LMO and where it runs, an
uplink compressor, an aggregator and a downlink compressor, run over
``torch.distributed`` (or a world of one).  Plugins come from entry points.

>>> import commlmo
>>> opt = commlmo.build_optimizer(model, "signmuon")        # doctest: +SKIP
>>> topk = commlmo.build_plugin("compressor", {"kind": "topk", "k": 0.05})
"""

from .comm import Communicator, LocalComm, SimulatedComm, TorchComm, simulate
from .config import OptimizerConfig, config_json_schema, load_config
from .errors import (
    CommlmoError,
    ConfigError,
    DistributedError,
    IncompatiblePluginsError,
    NonFiniteGradientError,
    NonFiniteInputError,
    PluginConflictError,
    PluginLoadError,
    PluginNotFoundError,
)
from .optimizer import CommOptimizer, build_optimizer
from .presets import PRESETS
from .registry import build_plugin, register

__version__ = "0.1.0"

__all__ = [
    "CommOptimizer",
    "build_optimizer",
    "load_config",
    "OptimizerConfig",
    "config_json_schema",
    "build_plugin",
    "register",
    "PRESETS",
    "Communicator",
    "LocalComm",
    "TorchComm",
    "SimulatedComm",
    "simulate",
    "CommlmoError",
    "ConfigError",
    "DistributedError",
    "IncompatiblePluginsError",
    "NonFiniteGradientError",
    "NonFiniteInputError",
    "PluginConflictError",
    "PluginLoadError",
    "PluginNotFoundError",
    "__version__",
]
