"""The embedded default model: a small OLMoE-architecture MoE language model (see MODEL_CARD.md).

Built by ``moepager train-tiny`` on the Python 3.11 documentation text; it ships inside the
package so ``moepager serve`` and the tests work without downloading anything.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def default_model_path() -> str:
    """Folder of the embedded model (config.json, model.safetensors, tokenizer files)."""
    return str(_HERE)
