"""unified-lora: a stress-driven SINGLE/MULTI/MIRROR controller over nested-rank LoRA adapters."""

from ._fused import FusedKernelsUnavailable
from .config import (MIRROR, MULTI, SINGLE, ActuatorConfig, MachineConfig, MirrorConfig, NestedLoRAConfig,
                     SignalConfig, check_rank_levels)
from .controller import UnifiedController, distributed_mean, setup_unified_lora
from .layer import NestedLoRALayer
from .machine import ModeMachine, Transition
from .mirror import MirrorSnapshot
from .model import (default_target_modules, inject_nested_lora, lora_layers, lora_state_dict, mark_modules_to_save,
                    merge_adapters, set_rank, trainable_parameters, unmerge_adapters)
from .signals import CompositeSignal, GradientStats, LossSignal, NonFiniteLossError
from .trace import StepRecord, TraceWriter, format_console, read_trace

__version__ = "0.1.0"
__all__ = [
    "UnifiedController", "setup_unified_lora", "distributed_mean",
    "NestedLoRALayer", "NestedLoRAConfig", "default_target_modules", "inject_nested_lora", "lora_layers", "lora_state_dict", "set_rank",
    "mark_modules_to_save", "merge_adapters", "unmerge_adapters", "trainable_parameters", "check_rank_levels",
    "LossSignal", "CompositeSignal", "GradientStats", "NonFiniteLossError",
    "ModeMachine", "Transition", "MachineConfig", "ActuatorConfig", "MirrorConfig", "SignalConfig", "MirrorSnapshot",
    "StepRecord", "TraceWriter", "format_console", "read_trace", "SINGLE", "MULTI", "MIRROR",
    "FusedKernelsUnavailable",
]
