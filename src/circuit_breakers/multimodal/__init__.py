"""Vision-language models: images in examples, rendering with a processor's chat template, batching.

RR itself is unchanged: it runs on the language model's hidden states; the vision tower and the
projector only feed it, frozen (docs/method.md section 9).
"""
from .processing import (MultimodalCollator, MultimodalFormatter, ProcessorTokenizer, load_image,
                         render_multimodal)

__all__ = ["MultimodalCollator", "MultimodalFormatter", "ProcessorTokenizer", "load_image", "render_multimodal"]
