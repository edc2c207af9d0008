"""circuit-breakers: Representation Rerouting (Zou et al., NeurIPS 2024) for any Hugging Face causal LM.

    from circuit_breakers import RRConfig, train
    result = train(RRConfig.load("configs/smollm2-135m.yaml"), "runs/smollm2-rr")
"""

from .config import ConfigError, RRConfig
from .models import load_model
from .training import RRTrainer, TrainResult, train

__version__ = "0.1.0"
__all__ = ["ConfigError", "RRConfig", "RRTrainer", "TrainResult", "load_model", "train", "__version__"]
