"""The cpu backend: torch on the CPU."""
from dsv3_rt.backends.cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
