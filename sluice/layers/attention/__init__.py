"""Paged attention: one layer models call, backends chosen per platform (see backend.py)."""

from sluice.layers.attention.backend import AttentionBackend, AttentionParams
from sluice.layers.attention.layer import BACKENDS, Attention, attention_layers, get_attn_backend, layer_windows
from sluice.layers.attention.metadata import AttentionMetadata, build_attention_metadata

__all__ = ["BACKENDS", "Attention", "AttentionBackend", "AttentionMetadata", "AttentionParams", "attention_layers",
           "build_attention_metadata", "get_attn_backend", "layer_windows"]
