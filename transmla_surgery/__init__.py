"""transmla-surgery: convert a Hugging Face GQA model's attention to DeepSeek-style MLA, in place."""

from .config import MLAConfig
from .errors import CalibrationError, ConfigError, ConversionError, TransMLAError, UnsupportedModelError
from .mla_attention import MLAAttention, MLAGeometry
from .report import ConversionReport
from .surgery import convert_to_mla

__all__ = [
    "MLAConfig",
    "convert_to_mla",
    "MLAAttention",
    "MLAGeometry",
    "ConversionReport",
    "TransMLAError",
    "ConfigError",
    "UnsupportedModelError",
    "CalibrationError",
    "ConversionError",
]
__version__ = "0.1.0"
