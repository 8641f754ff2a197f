"""Built-in architectures; importing this package registers them all."""
from . import gpt, llama, denseformer, mamba, scfa, cotformer, landmark  # noqa: F401
from ..quant import model as _quarot  # noqa: F401,E402  (registers "quarot")
from .transformer import Transformer
from ..transforms import layer_parallel  # noqa: F401,E402  (registers "layer_parallel")
