"""The run's configuration: the schema recipes are written against (run.py) and its stages, resolved once (stages.py)."""

from .run import (CarryOver, DebugConfig, DeepSpeedConfig, EvalConfig, LoggerConfig, LRConfig, ModelConfig,
                  ParallelConfig, PasskeyConfig, PathsConfig, RopeConfig, RunConfig, RunSchema, StageConfig,
                  TrainerConfig, load_run_config, register_schema)
from .stages import Rope, Stage, resolve_stages

__all__ = ["CarryOver", "DebugConfig", "DeepSpeedConfig", "EvalConfig", "LoggerConfig", "LRConfig", "ModelConfig",
           "ParallelConfig", "PasskeyConfig", "PathsConfig", "Rope", "RopeConfig", "RunConfig", "RunSchema", "Stage",
           "StageConfig", "TrainerConfig", "load_run_config", "register_schema", "resolve_stages"]
