"""flexgen-helm: a FlexGen-style offloading OPT runtime, its policy search, and a HELM plugin."""
from .engine.config import CompressionConfig, ConfigError, MemoryBudget, Policy


def __getattr__(name):  # Engine pulls in torch; import it only when asked for
    if name in ("Engine", "GenerationResult"):
        from .engine import engine
        return getattr(engine, name)
    raise AttributeError(name)


__all__ = ["Engine", "GenerationResult", "Policy", "CompressionConfig", "MemoryBudget", "ConfigError"]
