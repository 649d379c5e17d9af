"""Class-conditional image generation with mixed discrete diffusion (XDLM) over VQ image tokens."""

import importlib

__version__ = "0.1.0"

# Public names resolve on first use, so `xdlm-vision --help` does not pay for importing diffusers.
_PUBLIC_NAMES = {
    "XDLMScheduler": "xdlm_vision.scheduler",
    "XDLMSchedulerOutput": "xdlm_vision.scheduler",
    "XDLMTransformer": "xdlm_vision.transformer",
    "VQTokenizer": "xdlm_vision.tokenizer",
    "XDLMPipeline": "xdlm_vision.pipeline",
    "XDLMPipelineOutput": "xdlm_vision.pipeline",
}

__all__ = sorted(_PUBLIC_NAMES)


def __getattr__(name: str):
    if name not in _PUBLIC_NAMES:
        raise AttributeError(f"module 'xdlm_vision' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC_NAMES[name]), name)
    globals()[name] = value
    return value
