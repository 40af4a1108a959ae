"""dsv3-rt: one DeepSeek-V3 inference runtime for every accelerator."""
from dsv3_rt.core.config import ModelConfig
from dsv3_rt.core.errors import BackendError, CheckpointError, ConfigError, Dsv3Error, RequestError
from dsv3_rt.core.model import Model, load
from dsv3_rt.core.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["load", "Model", "ModelConfig", "SamplingParams", "Dsv3Error", "ConfigError", "CheckpointError",
           "BackendError", "RequestError", "__version__"]
