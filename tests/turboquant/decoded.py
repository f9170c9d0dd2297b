"""What a packed side stands for, decoded: the reference our attention is checked against."""

from services.turboquant.kernels.cases import decoded

__all__ = ["decoded"]
