"""Every shipped method, one file each. Importing this package registers them (in this order)."""

from longattn.methods.dense import Dense
from longattn.methods.neighborhood2d import Neighborhood2D
from longattn.methods.per_head_window import PerHeadWindow
from longattn.methods.power import PowerAttention
from longattn.methods.sliding_window import SlidingWindow
from longattn.methods.static_blocks import StaticBlocks
from longattn.methods.streaming_llm import StreamingLLM
from longattn.methods.strided import Strided

__all__ = [
    "Dense",
    "Neighborhood2D",
    "PerHeadWindow",
    "PowerAttention",
    "SlidingWindow",
    "StaticBlocks",
    "StreamingLLM",
    "Strided",
]
