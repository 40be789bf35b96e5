"""longattn: efficient attention for long sequences behind one small API.

from longattn import attention, methods
out = attention(q, k, v, method=methods.SlidingWindow(window=1024)).out
"""

from longattn import methods
from longattn.api import attention
from longattn.cache import KVCache
from longattn.method import Method, from_string, get, register, registry
from longattn.types import AttnOutput

__all__ = [
    "AttnOutput",
    "KVCache",
    "Method",
    "attention",
    "from_string",
    "get",
    "methods",
    "register",
    "registry",
]
__version__ = "0.1.0"
