"""transmla-surgery: convert a Hugging Face GQA model's attention to DeepSeek-style MLA, in place."""

from .config import MLAConfig
from .errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    ConversionError,
    TransMLAError,
    UnsupportedModelError,
)
from .mla_attention import MLAAttention, MLAGeometry, fuse_input_projections
from .report import ConversionReport
from .surgery import convert_to_mla
from .checkpoint import load_converted
from .export import ExportError, ExportReport, export_deepseek, load_exported
from .cache import MLAStaticCache
from .kernels import set_decode_backend
from .streaming import convert_checkpoint

__all__ = [
    "MLAConfig",
    "convert_to_mla",
    "convert_checkpoint",
    "MLAAttention",
    "MLAGeometry",
    "ConversionReport",
    "TransMLAError",
    "ConfigError",
    "UnsupportedModelError",
    "CalibrationError",
    "ConversionError",
    "CheckpointError",
    "export_deepseek",
    "load_exported",
    "load_converted",
    "ExportReport",
    "ExportError",
    "MLAStaticCache",
    "fuse_input_projections",
    "set_decode_backend",
]
__version__ = "0.1.0"
