"""Profiling: FLOPs, MACs, parameters, bytes, memory and latency."""

from .formulas import ELEMENT_COSTS, register_formula
from .latency import Latency, measure_latency
from .profiler import Comparison, ModuleProfile, Profile, profile

__all__ = [
    "ELEMENT_COSTS",
    "Comparison",
    "Latency",
    "ModuleProfile",
    "Profile",
    "measure_latency",
    "profile",
    "register_formula",
]
