"""bitsmith: quantize neural networks, measure what it cost, export to every runtime.

The public API only. `import bitsmith` needs torch and safetensors alone; transformers, gguf, tqdm and
PyYAML load lazily where they are used.
"""

from .apply import quantize_model as quantize
from .checkpoint import load, save
from .errors import BitsmithError
from .primitives import QWeight, dequantize_weight, quantize_weight
from .recipe import Recipe, Scheme
from .size import size_report

__version__ = "0.1.0"
__all__ = ["quantize", "save", "load", "load_model", "perplexity", "size_report", "Recipe", "Scheme",
           "QWeight", "quantize_weight", "dequantize_weight", "BitsmithError"]


def load_model(spec: str, **kwargs):
    """A bundled name (smollm2-135m, minilm-l6), a local HF directory, a .gguf file, a hub id, or a
    bitsmith checkpoint directory -> LoadedModel(model, tokenizer, ...)."""
    from .models import load_any

    return load_any(spec, **kwargs)


def perplexity(model, tokenizer, text, **kwargs):
    from .evaluate import perplexity as _ppl

    return _ppl(model, tokenizer, text, **kwargs)
