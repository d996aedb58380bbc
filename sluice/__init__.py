"""sluice: an LLM inference and serving engine with vLLM's interfaces."""

from sluice.outputs import CompletionOutput, Logprob, RequestOutput
from sluice.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `import sluice.sampling_params` stays light (no model code).
    if name == "LLM":
        from sluice.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'sluice' has no attribute {name!r}")
