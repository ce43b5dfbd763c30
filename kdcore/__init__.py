"""kdcore: teacher-student (knowledge distillation) anomaly detection on images of normal products."""
__version__ = "0.1.0"

from kdcore.methods.base import AnomalyMethod, TrainProgress, load  # noqa: E402
from kdcore.registry import create_method, list_methods  # noqa: E402

__all__ = ["AnomalyMethod", "TrainProgress", "create_method", "list_methods", "load", "__version__"]
