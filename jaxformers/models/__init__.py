"""Built-in architectures; importing this package registers them all."""
from . import gpt, llama, denseformer, mamba, scfa, cotformer  # noqa: F401
from .transformer import Transformer
