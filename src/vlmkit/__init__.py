"""vlmkit: the whole life of a vision-language model, from composition to serving.

Importing the package imports no torch: the CLI answers `--help` and config errors at once.
`vlmkit.VisionLanguageModel` and `vlmkit.VLMConfig` load the model code (and register it with
transformers' Auto classes) on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["VLMConfig", "VisionLanguageModel", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("VisionLanguageModel", "VLMConfig"):
        from vlmkit.models import vlm

        vlm.register_auto_classes()
        return getattr(vlm, name)
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
