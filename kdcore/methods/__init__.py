"""Built-in methods, one module each; importing a module registers its method, so every module here is imported."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
