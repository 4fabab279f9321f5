"""flexgen-helm: a FlexGen-style offloading runtime (OPT, Llama, Mistral, Qwen2/2.5, Qwen3), its policy
search, and a HELM plugin."""
from .engine.config import CompressionConfig, ConfigError, MemoryBudget, Policy


def __getattr__(name):  # Engine pulls in torch; import it only when asked for
    if name in ("Engine", "GenerationResult"):
        from .engine import engine
        return getattr(engine, name)
    if name == "load_engine":
        from .runtime import load_engine
        return load_engine
    raise AttributeError(name)


__all__ = ["Engine", "load_engine", "GenerationResult", "Policy", "CompressionConfig", "MemoryBudget", "ConfigError"]
