"""Pooling models (vLLM's runner="pooling"): one vector per prompt instead of generated text.

params.py: what a request asks for (PoolingParams). config.py: how the model pools (its
sentence-transformers files, or --pooler-config) and which runner it gets. inputs.py: prompts
to core requests. pooler.py: the runner side, chunk by chunk. outputs.py: vLLM's offline results.
"""
