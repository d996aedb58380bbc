"""How a model pools: read once from its folder (sentence-transformers' modules.json,
1_Pooling/config.json, a Normalize module), overridden key by key by --pooler-config."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from sluice.config import EngineConfig
from sluice.layers.linear_path import prompt_dtype
from sluice.loader import get_tokenizer
from sluice.pooling.params import PoolingParams

# Architectures without a KV cache (bidirectional attention over whole prompts).
ENCODER_ONLY = ("BertModel", "XLMRobertaModel", "BertForSequenceClassification",
                "XLMRobertaForSequenceClassification")
# sentence-transformers' 1_Pooling/config.json flags -> vLLM's pooling_type
_ST_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN",
             "pooling_mode_lasttoken": "LAST"}


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str  # LAST | MEAN | CLS
    normalize: bool
    hidden_size: int
    classifier: bool = False  # a *ForSequenceClassification head: classify and score work
    matryoshka: bool = False  # the model's config declares Matryoshka dimensions: a cut embedding stays meaningful
    dimensions: int | None = None  # vLLM's pooler_config.dimensions: the cut when a request names none


def is_encoder_only(hf_config) -> bool:
    return bool(set(hf_config.architectures or ()) & set(ENCODER_ONLY))


def is_classifier(hf_config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in hf_config.architectures or ())


def position_offset(hf_config) -> int:
    """Rows of the position table before position 0: RoBERTa's start after its padding index."""
    if any(a.startswith("XLMRoberta") for a in hf_config.architectures or ()):
        return hf_config.pad_token_id + 1
    return 0


def complete_encoder_config(config: EngineConfig, hf_config) -> None:
    """An encoder splits a (query, document) pair into token types at [SEP]; configs rarely
    name its id, the tokenizer does. Its dtype "auto" is settled here (linear_path.prompt_dtype)."""
    if not is_encoder_only(hf_config):
        return
    if getattr(hf_config, "sep_token_id", None) is None:
        hf_config.sep_token_id = get_tokenizer(config).sep_token_id
    config.model.torch_dtype = prompt_dtype(config.model, hf_config.hidden_size, hf_config.intermediate_size)


def resolve_runner(config: EngineConfig, hf_config) -> str:
    """generate or pooling: the one reading of runner="auto"."""
    runner = config.pooling.runner
    if runner == "auto":
        runner = "pooling" if is_encoder_only(hf_config) or is_classifier(hf_config) else "generate"
    return runner


def _sentence_transformers(folder: str) -> dict:
    """The pooling a sentence-transformers folder declares; {} when it has none."""
    try:
        with open(os.path.join(folder, "modules.json")) as f:
            modules = json.load(f)
    except (OSError, ValueError):
        return {}
    found: dict = {"normalize": any(m.get("type", "").endswith("Normalize") for m in modules)}
    pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pooling is not None:
        with open(os.path.join(folder, pooling.get("path", ""), "config.json")) as f:
            flags = json.load(f)
        found["pooling_type"] = next((kind for key, kind in _ST_MODES.items() if flags.get(key)), "MEAN")
    return found


def load_pooler_config(config: EngineConfig, folder: str | None, hf_config) -> PoolerConfig:
    """The model folder's pooling, then --pooler-config over it. Defaults as vLLM: CLS for
    encoder-only models and classifiers, LAST with normalize for decoder embedders."""
    encoder = is_encoder_only(hf_config)
    values = {"pooling_type": "CLS" if encoder else "LAST", "normalize": not is_classifier(hf_config),
              "hidden_size": hf_config.hidden_size, "classifier": is_classifier(hf_config),
              "matryoshka": bool(getattr(hf_config, "matryoshka_dimensions", None)
                                 or getattr(hf_config, "is_matryoshka", False))}
    values.update(_sentence_transformers(folder) if folder else {})
    values.update(config.pooling.pooler_config or {})
    pooler = PoolerConfig(**values)
    check_pooling_params(PoolingParams(dimensions=pooler.dimensions), pooler, "pooler_config: dimensions")
    return pooler


def require_runner(pooler: PoolerConfig | None, needed: str, what: str) -> None:
    """Generation on a pooling model, or pooling on a generating one: the one refusal."""
    runner = "generate" if pooler is None else "pooling"
    if runner != needed:
        raise ValueError(f"{what} needs a model run with runner={needed!r}; this model runs runner={runner!r} "
                         f"(--runner / LLM(..., runner=...))")


def check_pooling_params(params: PoolingParams, pooler: PoolerConfig | None, field: str = "dimensions") -> None:
    """classify and reward only with a classification head; dimensions only for a Matryoshka model, and
    no more than its hidden size."""
    if pooler is not None and params.task in ("classify", "reward") and not pooler.classifier:
        raise ValueError("classify, score and reward need a *ForSequenceClassification model (a classification "
                         "head); this model only embeds")
    if params.dimensions is None or params.task != "embed" or pooler is None:
        return
    if not pooler.matryoshka:
        raise ValueError(f"{field}: this model does not support Matryoshka embeddings (its config has no "
                         "matryoshka_dimensions); leave dimensions out")
    if params.dimensions > pooler.hidden_size:
        raise ValueError(f"{field}={params.dimensions} is more than the model's {pooler.hidden_size} dimensions")
