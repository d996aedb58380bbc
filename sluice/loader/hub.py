"""Fetch a checkpoint from the Hugging Face hub: only the files the engine reads."""

from __future__ import annotations

import os

from sluice.loader import ModelLoadError

# Fail fast without network access (the library waits 10 s per metadata request); the
# library's own HF_HUB_ETAG_TIMEOUT still wins when the user sets it.
HUB_TIMEOUT_S = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 5)

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.*",
]
TOKENIZER_PATTERNS = [p for p in ALLOW_PATTERNS if "safetensors" not in p]  # --tokenizer from the hub: no weights
# Mistral repos also ship the same weights in Mistral's own format.
IGNORE_PATTERNS = ["consolidated*.safetensors"]


def download_snapshot(repo_id: str, revision: str | None = None, download_dir: str | None = None,
                      tokenizer_only: bool = False) -> str:
    """Download (or reuse from the cache: download_dir, else Hugging Face's) a hub repo at a
    revision; return its local folder."""
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=TOKENIZER_PATTERNS if tokenizer_only else ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            etag_timeout=HUB_TIMEOUT_S,
        )
    except Exception as e:  # network, auth, missing repo, bad id: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not fetch '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {reason}); "
            "pass a local folder with config.json and *.safetensors, or a .gguf file"
        ) from e
