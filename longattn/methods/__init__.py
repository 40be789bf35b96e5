"""Every shipped method, one file each. Importing this package registers them (in this order)."""

from longattn.methods.dense import Dense
from longattn.methods.double_sparsity import DoubleSparsity
from longattn.methods.duo_attention import DuoAttention
from longattn.methods.infllm import InfLLM
from longattn.methods.loki import Loki
from longattn.methods.neighborhood2d import Neighborhood2D
from longattn.methods.oracle_topk import OracleTopK
from longattn.methods.per_head_window import PerHeadWindow
from longattn.methods.power import PowerAttention
from longattn.methods.quest import Quest
from longattn.methods.razor_attention import RazorAttention
from longattn.methods.sliding_window import SlidingWindow
from longattn.methods.static_blocks import StaticBlocks
from longattn.methods.streaming_llm import StreamingLLM
from longattn.methods.strided import Strided
from longattn.methods.tidal_decode import TidalDecode

__all__ = [
    "Dense",
    "DoubleSparsity",
    "DuoAttention",
    "InfLLM",
    "Loki",
    "Neighborhood2D",
    "OracleTopK",
    "PerHeadWindow",
    "PowerAttention",
    "Quest",
    "RazorAttention",
    "SlidingWindow",
    "StaticBlocks",
    "StreamingLLM",
    "Strided",
    "TidalDecode",
]
