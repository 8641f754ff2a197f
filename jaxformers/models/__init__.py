"""Built-in architectures; importing this package registers them all."""
from . import gpt, llama, denseformer, mamba, scfa, cotformer, landmark  # noqa: F401
from .transformer import Transformer
