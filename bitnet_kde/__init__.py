"""bitnet-kde: knowledge distillation from a locked teacher LLM into a BitNet b1.58 student."""

__version__ = "0.1.0"

# registers the Hydra resolvers that configs/paths uses (local_dir, run_dir_on_store)
from bitnet_kde import storage as _storage  # noqa: E402,F401
