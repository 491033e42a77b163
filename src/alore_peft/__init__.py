"""ALoRE (Aggregating Low Rank Experts) for Hugging Face PEFT.

Importing this package registers ALoRE with PEFT, so the usual PEFT API works:

    >>> import torch
    >>> from peft import get_peft_model
    >>> from alore_peft import AloreConfig
    >>> base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> model = get_peft_model(base, AloreConfig(r=2, num_experts=4, target_modules=["0"]))
    >>> model.print_trainable_parameters()
    trainable params: 128 || all params: 468 || trainable%: 27.3504
"""

from . import functional
from ._registration import ALORE_PEFT_TYPE, register
from .auto import AutoPeftModelForImageClassification
from .block import AloreBlock
from .config import AloreConfig
from .layer import AloreLayer, Conv2d, Linear
from .model import AloreModel

register(AloreConfig, AloreModel)

__version__ = "0.1.0"

__all__ = [
    "ALORE_PEFT_TYPE",
    "AloreBlock",
    "AloreConfig",
    "AutoPeftModelForImageClassification",
    "AloreLayer",
    "AloreModel",
    "Conv2d",
    "Linear",
    "functional",
    "__version__",
]
