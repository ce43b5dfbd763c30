"""Built-in methods; importing a module registers it."""
from kdcore.methods import rd, stpm  # noqa: F401
