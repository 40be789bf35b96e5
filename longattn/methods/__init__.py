"""Every shipped method, one file each. Importing this package registers them (in this order)."""

from longattn.methods.aaren import Aaren
from longattn.methods.adakv import AdaKV
from longattn.methods.agent_attention import AgentAttention
from longattn.methods.anchor_attention import AnchorAttention
from longattn.methods.attendre import Attendre
from longattn.methods.block_oracle import BlockOracle
from longattn.methods.block_topk import BlockTopK
from longattn.methods.block_topp import BlockTopP
from longattn.methods.combiner import Combiner
from longattn.methods.cosine import Cosine
from longattn.methods.dense import Dense
from longattn.methods.dhsa import DHSA
from longattn.methods.double_sparsity import DoubleSparsity
from longattn.methods.duo_attention import DuoAttention
from longattn.methods.elu_linear import EluLinear
from longattn.methods.expected_attention import ExpectedAttention
from longattn.methods.flexprefill import FlexPrefill
from longattn.methods.flowformer import Flowformer
from longattn.methods.gated_deltanet import GatedDeltaNet
from longattn.methods.h2o import H2O
from longattn.methods.hedgehog import Hedgehog
from longattn.methods.hip import HiP
from longattn.methods.infini_attention import InfiniAttention
from longattn.methods.infllm import InfLLM
from longattn.methods.knorm import KNorm
from longattn.methods.latte import Latte
from longattn.methods.log_normal import LogNormal
from longattn.methods.loki import Loki
from longattn.methods.mega import Mega
from longattn.methods.minference import MInference
from longattn.methods.neighborhood2d import Neighborhood2D
from longattn.methods.oracle_topk import OracleTopK
from longattn.methods.per_head_window import PerHeadWindow
from longattn.methods.performer import Performer
from longattn.methods.power import PowerAttention
from longattn.methods.proxy_attn import ProxyAttn
from longattn.methods.pyramidkv import PyramidKV
from longattn.methods.qfilters import QFilters
from longattn.methods.quest import Quest
from longattn.methods.razor_attention import RazorAttention
from longattn.methods.sale import SALE
from longattn.methods.scatterbrain import Scatterbrain
from longattn.methods.sea import SEA
from longattn.methods.sla import SLA
from longattn.methods.sliding_window import SlidingWindow
from longattn.methods.snapkv import SnapKV
from longattn.methods.soft import SOFT
from longattn.methods.sparge import Sparge
from longattn.methods.sse import SSE
from longattn.methods.static_blocks import StaticBlocks
from longattn.methods.streaming_llm import StreamingLLM
from longattn.methods.strided import Strided
from longattn.methods.taylor import Taylor
from longattn.methods.think import ThinK
from longattn.methods.tidal_decode import TidalDecode
from longattn.methods.tova import TOVA
from longattn.methods.window_linear import WindowPlusLinear

__all__ = [
    "Aaren",
    "AdaKV",
    "AgentAttention",
    "AnchorAttention",
    "Attendre",
    "BlockOracle",
    "BlockTopK",
    "BlockTopP",
    "Combiner",
    "Cosine",
    "DHSA",
    "Dense",
    "DoubleSparsity",
    "DuoAttention",
    "EluLinear",
    "ExpectedAttention",
    "FlexPrefill",
    "Flowformer",
    "GatedDeltaNet",
    "H2O",
    "Hedgehog",
    "HiP",
    "InfiniAttention",
    "InfLLM",
    "KNorm",
    "Latte",
    "LogNormal",
    "Loki",
    "Mega",
    "MInference",
    "Neighborhood2D",
    "OracleTopK",
    "Performer",
    "PerHeadWindow",
    "PowerAttention",
    "ProxyAttn",
    "PyramidKV",
    "QFilters",
    "Quest",
    "RazorAttention",
    "SALE",
    "SLA",
    "Scatterbrain",
    "SEA",
    "SlidingWindow",
    "SnapKV",
    "SOFT",
    "Sparge",
    "SSE",
    "StaticBlocks",
    "StreamingLLM",
    "Strided",
    "Taylor",
    "ThinK",
    "TidalDecode",
    "TOVA",
    "WindowPlusLinear",
]
