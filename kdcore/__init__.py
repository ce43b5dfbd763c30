"""kdcore: teacher-student (knowledge distillation) anomaly detection on images of normal products.

The public API is imported lazily: ``import kdcore.store`` (the web app, the job store) must not pay for
importing torch, while ``kdcore.create_method`` and friends are one attribute access away.
"""
from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "AnomalyMethod": "kdcore.methods.base",
    "TrainProgress": "kdcore.methods.base",
    "load": "kdcore.methods.base",
    "create_method": "kdcore.registry",
    "list_methods": "kdcore.registry",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'kdcore' has no attribute {name!r}")
