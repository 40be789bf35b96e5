"""``longattn.hf``: the public name of the Hugging Face integration (imports transformers).

``import longattn`` never imports transformers; ``from longattn import hf`` does, through
``longattn.integrations.hf``, which stays the only module that imports it.
"""

from longattn.integrations.hf import (
    TokenPositions,
    capture_qkv,
    load_pretrained,
    returned_cache,
    use,
    with_cache,
)

__all__ = [
    "TokenPositions",
    "capture_qkv",
    "load_pretrained",
    "returned_cache",
    "use",
    "with_cache",
]
