"""OpenAI-compatible request models (pydantic v2), the API error type and response envelopes.

Requests take every field of OpenAI's chat and completions schemas plus vLLM's extensions (top_k,
min_p, bad_words, prompt_logprobs, structured_outputs, ...). Fields that only describe the caller
(user, metadata, safety_identifier, ...) are accepted and ignored. Unknown fields are accepted with
a warning logged once per name, as vLLM does; with `--strict-request-fields` they are a 400 naming
the field, which catches typos. Features the engine lacks (beam search, logits processors)
are refused with a 400 by `to_sampling_params`; so is a bad structured-output spec or tool
definition, naming its field (`response_format.json_schema.schema`, `tools.0...`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from abc import abstractmethod
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)
from pydantic_core import InitErrorDetails

from sluice.entrypoints.openai.tool_calls import named_call_schema, required_calls_schema
from sluice.sampling_params import SamplingParams, StructuredOutputsParams
from sluice.structured_output.backend import check_spec

logger = logging.getLogger(__name__)



# ---- errors -------------------------------------------------------------------------------
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for(status_code: int) -> str:
    """OpenAI's conventional `type` string for an HTTP status."""
    return "server_error" if status_code >= 500 else _ERROR_TYPES.get(status_code, "invalid_request_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """A failure answered to the client as OpenAI's error JSON (status, body, extra headers)."""

    def __init__(self, message: str, status_code: int = 400, type: str | None = None,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type or error_type_for(status_code)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def validation_error_to_api_error(exc: Any) -> APIError:
    """A pydantic ValidationError, FastAPI RequestValidationError or their `errors()` list -> a 400
    whose message names each bad field path (`messages.0.role`) and whose param is the first."""
    errors = exc if isinstance(exc, list) else exc.errors()
    messages: list[str] = []
    first_param: str | None = None
    for err in errors:
        loc = list(err.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path"):  # FastAPI prefixes where the value came from
            loc = loc[1:]
        path = ".".join(str(part) for part in loc)
        if err.get("type") == "json_invalid":
            path = ""
        if first_param is None and path:
            first_param = path
        description = _describe(err)
        if path:
            message = f"{path}: {description}"
        else:  # a whole-body check: its own message names the fields
            message = description if err.get("type") == "value_error" else f"request body: {description}"
        if message not in messages:
            messages.append(message)
    if not messages:
        messages = ["invalid request"]
    extra = f" (and {len(messages) - 5} more)" if len(messages) > 5 else ""
    return APIError("; ".join(messages[:5]) + extra, 400, param=first_param)


def _describe(err: dict) -> str:
    kind, msg = err.get("type"), str(err.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "field required"
    if kind == "json_invalid":
        return f"invalid JSON ({(err.get('ctx') or {}).get('error', msg)})"
    if kind in ("value_error", "assertion_error"):
        return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = err.get("input")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return f"{msg} (got {_short_repr(value)})"
    return msg


def _short_repr(value: Any, limit: int = 50) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Deprecations are logged once per process, not once per request."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# ---- reusable field validators --------------------------------------------------------------
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_content(value: Any) -> Any:
    """Message content: a string, or a list of text and image parts, kept as [{"type": "text",
    "text": ...}] (a `refusal` part of an assistant turn counts as text) and [{"type": "image_url",
    "image_url": {"url": ...}}]; the template decides how it sees them."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"must be a string or a list of content parts, got {_type_name(value)}")
    if not value:
        raise ValueError("must not be an empty list of content parts")
    parts = []
    for i, part in enumerate(value):
        if isinstance(part, str):  # vLLM accepts bare strings in the list
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise ValueError(f"part {i} must be an object, got {_type_name(part)}")
        kind = part.get("type")
        if kind == "image_url":
            image = part.get("image_url")
            image = {"url": image} if isinstance(image, str) else image
            if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                raise ValueError(f"part {i} needs an 'image_url' object with a string 'url'")
            parts.append({"type": "image_url", "image_url": {"url": image["url"]}})
            continue
        key = "refusal" if kind == "refusal" else "text"
        if kind not in ("text", "refusal"):
            raise ValueError(f"part {i} has type {kind!r}; the parts taken are 'text' and 'image_url'")
        if not isinstance(part.get(key), str):
            raise ValueError(f"part {i} needs a string '{key}'")
        parts.append({"type": "text", "text": part[key]})
    return parts


def has_images(messages: list["ChatMessage"]) -> bool:
    return any(isinstance(m.content, list) and any(p["type"] == "image_url" for p in m.content) for m in messages)


def content_as_text(content: str | list[dict] | None) -> str:
    """The `string` content format: text parts joined with newlines, as vLLM does; None is ''.
    (Image parts go to the model's processor, which places them: see multimodal.split_images.)"""
    if content is None:
        return ""
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content if p["type"] == "text")


def content_as_parts(content: str | list[dict] | None) -> list[dict]:
    """The `openai` content format: always a list of text parts."""
    if content is None:
        return []
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or a list of strings")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _check_prompt(value: Any) -> Any:
    """Completions prompt: a string, a list of strings, a list of token ids or a list of id lists."""
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be empty")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty string, list of strings, list of token ids or list of token-id lists")
    if _is_token_ids(value):
        return value
    if all(isinstance(p, str) for p in value) or all(_is_token_ids(p) for p in value):
        for i, p in enumerate(value):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        return value
    raise ValueError("a list prompt must hold only strings, only token ids, or only lists of token ids")


def _check_tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict) \
            and isinstance(value["function"].get("name"), str):
        return value
    raise ValueError("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}")


# Arguments of apply_chat_template that the server sets itself; in chat_template_kwargs they
# would collide ("got multiple values") or change what the call returns.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tokenize", "chat_template", "add_generation_prompt", "continue_final_message",
    "tools", "documents", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def _check_template_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    reserved = sorted(set(value or {}) & _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise ValueError(f"may not set {', '.join(reserved)}")
    return value


Content = Annotated[Any, AfterValidator(_check_content)]
Stop = Annotated[str | list[str] | None, BeforeValidator(_check_stop)]
Prompt = Annotated[Any, AfterValidator(_check_prompt)]
ToolChoice = Annotated[Any, AfterValidator(_check_tool_choice)]
TemplateKwargs = Annotated[dict[str, Any] | None, AfterValidator(_check_template_kwargs)]


# ---- the unknown-field policy --------------------------------------------------------------
class OpenAIModel(BaseModel):
    """Every request object: unknown fields are logged once per name and dropped, as vLLM does;
    with `strict_fields` (the server's --strict-request-fields) they are a 400 naming each."""

    model_config = ConfigDict(extra="allow")
    strict_fields: ClassVar[bool] = False  # set once per API process

    @model_validator(mode="wrap")
    @classmethod
    def _unknown_fields(cls, data: Any, handler):
        known = _field_names(cls)
        unknown = [key for key in data if key not in known] if isinstance(data, dict) else []
        if unknown and OpenAIModel.strict_fields:
            errors = [InitErrorDetails(type="extra_forbidden", loc=(key,), input=data[key]) for key in unknown]
            try:
                handler(data)
            except ValidationError as exc:  # report the other errors too
                errors = [*exc.errors(include_url=False), *errors]
            raise ValidationError.from_exception_data(cls.__name__, errors)
        result = handler(data)
        for key in unknown:
            _warn_once(f"field:{key}", f"request field {key!r} is unknown to this server and ignored")
        if unknown:
            result.__pydantic_extra__ = {}
        return result


@functools.cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    """A model's field names and aliases: what a request may spell."""
    return frozenset(model.model_fields) | {info.alias for info in model.model_fields.values() if info.alias}


# ---- values JSON allows but the engine cannot take -------------------------------------------
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _bad_json_value(value: Any) -> tuple[list, str] | None:
    """(where inside `value`, what is wrong) for the first integer outside int64 (the core's wire
    format) or string that is not valid Unicode (JSON's \\ud800 escapes decode to lone surrogates,
    which no tokenizer takes); None when all is well."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return [], f"not valid Unicode: a lone surrogate {value[exc.start]!r} at character {exc.start}"
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            return [], f"{value} is outside the 64-bit integer range"
    elif isinstance(value, list):
        if value and all(type(item) is int for item in value):  # token ids: checked at C speed
            if INT64_MIN <= min(value) and max(value) <= INT64_MAX:
                return None
        for i, item in enumerate(value):
            if (found := _bad_json_value(item)) is not None:
                return [i, *found[0]], found[1]
    elif isinstance(value, dict):
        for key, item in value.items():
            if (found := _bad_json_value(key) or _bad_json_value(item)) is not None:
                return [key, *found[0]], found[1]
    return None


class _ApiRequest(OpenAIModel):
    """What every request body shares: strict types, as OpenAI's API (`true` and `"8"` are not
    numbers), and only values the engine can take (see _bad_json_value)."""

    model_config = ConfigDict(strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _engine_safe(cls, value: Any, info) -> Any:
        found = _bad_json_value(value)
        if found is not None:
            inner, problem = found
            where = f" (at {'.'.join(map(str, [info.field_name, *inner]))})" if inner else ""
            raise ValueError(problem + where)
        return value


# ---- nested objects ------------------------------------------------------------------------
class ChatMessage(BaseModel):
    """One turn. Extra keys (name, tool_calls, tool_call_id, reasoning_content, ...) pass
    through to the chat template, which may use them."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Content = Field(default=None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: str | None, info) -> str | None:
        role = info.data.get("role")
        if value is None and role is not None and role != "assistant":
            raise ValueError(f"is required for role '{role}'")
        return value

    def to_template(self, content_format: str = "string") -> dict[str, Any]:
        """The dict handed to apply_chat_template. Content is always there, in the template's
        format ("string": text, "openai": a list of text parts), also when an assistant turn
        with tool_calls has none; `developer` (OpenAI's newer name for the system role) becomes
        `system`, the only one chat templates know; tool-call arguments (JSON text in OpenAI's
        API) become objects, which templates expect."""
        message = self.model_dump(exclude_none=True)
        message["content"] = content_as_parts(self.content) if content_format == "openai" else content_as_text(self.content)
        if self.role == "developer":
            message["role"] = "system"
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except ValueError:
                    pass  # not JSON: the template gets the text
        return message


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: running usage on every chunk
    include_obfuscation: bool | None = None  # OpenAI's padding of stream chunks; none is sent


class JsonSchemaFormat(OpenAIModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # `schema` is a BaseModel method
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def to_params(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise APIError("response_format.json_schema.schema is required for type 'json_schema'",
                               param="response_format.json_schema.schema")
            return StructuredOutputsParams(json=self.json_schema.schema_)
        return None


class StructuredOutputs(OpenAIModel):
    """vLLM's structured-output constraints (the successor of the guided_* fields)."""

    json_: Any = Field(default=None, alias="json")  # `json` would shadow BaseModel.json
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in (self.json_, self.regex, self.choice, self.grammar, self.json_object))

    def to_params(self) -> StructuredOutputsParams | None:
        if self.is_empty():
            return None
        try:
            return StructuredOutputsParams(json=self.json_, regex=self.regex, choice=self.choice,
                                           grammar=self.grammar, json_object=self.json_object)
        except ValueError as exc:  # messages start with the field: "structured_outputs.choice must ..."
            raise APIError(str(exc), param=re.match(r"[\w.]+", str(exc)).group()) from None


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


# ---- requests --------------------------------------------------------------------------------
# Request fields copied onto SamplingParams under the same name when set (None: its default).
_PASSTHROUGH = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "bad_words", "allowed_token_ids",
    "truncate_prompt_tokens",
)
_GUIDED_KEYS = ("json", "regex", "choice", "grammar")
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value


class _SamplingRequest(_ApiRequest):
    """Fields and SamplingParams conversion shared by chat and legacy completions."""

    model: str | None = None  # None: the first served model name
    n: int | None = Field(default=1, ge=1)
    best_of: int | None = None  # deprecated; only 1 is accepted
    max_tokens: int | None = Field(default=None, ge=1)
    stop: Stop = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int | None = 0
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias added to its logit
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # keep the last k (-1: max_model_len)
    prompt_logprobs: int | None = Field(default=None, ge=0)
    return_tokens_as_token_ids: bool | None = None  # logprob tokens as "token_id:N"
    return_token_ids: bool | None = None  # the prompt's and the output's token ids in the response
    request_id: str | None = Field(default=None, min_length=1)
    cache_salt: str | None = Field(default=None, min_length=1)  # isolates this caller's prefix cache
    add_special_tokens: bool | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Any = None  # deprecated spellings of structured_outputs.*
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    use_beam_search: bool | None = None  # refused when true
    logits_processors: list[Any] | None = None  # refused when set: no --logits-processor-pattern
    prompt_embeds: Any = None  # refused when set: this engine takes text and token ids
    # Accepted and ignored: they describe the caller, or tune features this engine does not have.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    length_penalty: float | None = None  # beam search only
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value is None:
            return None
        if value != 1:
            raise ValueError(f"must be 1 (best_of is deprecated and unsupported; use n), got {value}")
        _warn_once("best_of", "best_of is deprecated and ignored; use n")
        return value

    @model_validator(mode="after")
    def _guided_to_structured_outputs(self):
        legacy = {key: getattr(self, f"guided_{key}") for key in _GUIDED_KEYS}
        legacy = {key: value for key, value in legacy.items() if value is not None}
        if not legacy:
            return self
        _warn_once("guided", "guided_json/guided_regex/guided_choice/guided_grammar are deprecated; "
                             "use structured_outputs: {json|regex|choice|grammar: ...}")
        current = {}
        if self.structured_outputs is not None:
            current = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        clash = sorted(legacy.keys() & current.keys())
        if clash:
            raise ValueError(f"guided_{clash[0]} and structured_outputs.{clash[0]} are both set; "
                             "use structured_outputs only")
        self.structured_outputs = StructuredOutputs.model_validate({**current, **legacy})
        return self

    # ---- conversion ----
    def to_sampling_params(self, default_max_tokens: int, max_n: int,
                           defaults: dict | None = None) -> SamplingParams:
        """Raises APIError(400) naming the field for anything refused.

        default_max_tokens is the room left in the context (max_model_len - prompt tokens): the
        value of a null max_tokens, and the cap of completions' default 16. A larger max_tokens
        the client asked for is refused, as OpenAI does. A prompt that leaves no room at all is
        the engine's error to report. `defaults` (the model's generation config, vLLM's
        --generation-config) fill the fields the request leaves unset.
        """
        self._check_supported()
        n = 1 if self.n is None else self.n
        if n > max_n:
            raise APIError(f"n must be at most {max_n}, got {n}", param="n")
        defaults = defaults or {}
        kwargs = {**defaults, **{name: getattr(self, name) for name in _PASSTHROUGH if getattr(self, name) is not None}}
        kwargs["max_tokens"] = self._max_tokens(default_max_tokens, defaults.get("max_tokens"))
        kwargs["logprobs"], kwargs["prompt_logprobs"] = self._logprob_counts()
        kwargs["structured_outputs"] = self._structured_outputs()
        kwargs["logit_bias"] = self._logit_bias()
        if self.kv_transfer_params is not None:  # vLLM's place for them: SamplingParams.extra_args
            if n > 1:
                raise APIError(f"kv_transfer_params describes one sequence's KV; n must be 1, got {n}",
                               param="kv_transfer_params")
            kwargs["extra_args"] = {"kv_transfer_params": self.kv_transfer_params}
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            raise APIError(str(exc), param=self.param_of(str(exc))) from None

    def _check_supported(self) -> None:
        for name in ("use_beam_search", "logits_processors", "prompt_embeds"):
            if getattr(self, name):
                raise APIError(f"{name} is not supported by this server", param=name)

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's {"token id": bias} with ids as text; each bias in [-100, 100]."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.strip().lstrip("-").isdigit():
                raise APIError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
                raise APIError(f"logit_bias values must be in [-100, 100], got {value} for token {key}",
                               param="logit_bias")
            bias[int(key)] = value
        return bias

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The one constraint on the output, its grammar checked; a 400 naming the field if bad."""
        constraints = self._constraints()
        if len(constraints) > 1:
            names = list(constraints)
            raise APIError(f"{' and '.join(names)} both constrain the output; use one of them", param=names[-1])
        if not constraints:
            return None
        [(params, field)] = constraints.values()
        try:
            check_spec(params, field)
        except ValueError as exc:
            raise APIError(str(exc), param=field or params.field_name()) from None
        return params

    def _constraints(self) -> dict[str, tuple[StructuredOutputsParams, str | None]]:
        """Request field -> (its constraint, the field its errors name; None: structured_outputs.<kind>)."""
        constraints = {}
        params = self.structured_outputs.to_params() if self.structured_outputs is not None else None
        if params is not None:
            constraints["structured_outputs"] = (params, None)
        response_format = self.response_format.to_params() if self.response_format is not None else None
        if response_format is not None:
            constraints["response_format"] = (response_format, "response_format.json_schema.schema")
        return constraints

    def _max_tokens(self, room: int, default: int | None = None) -> int:
        requested, name = self._requested_max_tokens(), self._max_tokens_param()
        if requested is None:
            return max(min(room, default or room), 1)
        if requested > room >= 1 and name in self.model_fields_set:
            raise APIError(f"{name}={requested} is too large: the prompt leaves room for {room} tokens "
                           "in the context", param=name)
        return min(requested, max(room, 1))

    def _requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _max_tokens_param(self) -> str:
        return "max_tokens"

    @abstractmethod
    def _logprob_counts(self) -> tuple[int | None, int | None]:
        """(SamplingParams.logprobs, SamplingParams.prompt_logprobs)."""

    def param_of(self, message: str) -> str | None:
        """The request field an error is about: SamplingParams' and the engine's messages start
        with the name of their own field, which may be spelled differently here."""
        name = re.match(r"\w*", message).group()
        renamed = self._renamed_params()
        if name in renamed:
            return renamed[name]
        return name if name in type(self).model_fields else None

    def _renamed_params(self) -> dict[str, str]:
        """Engine-side field name -> this request's field name."""
        return {"max_tokens": self._max_tokens_param(), "prompt_token_ids": "prompt"}

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return self.include_usage() and bool(self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer max_tokens; wins
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message is left open to continue
    echo: bool | None = False  # with continue_final_message: the reply starts with the last message
    chat_template: str | None = None  # a per-request template (text)
    chat_template_kwargs: TemplateKwargs = None
    documents: list[dict[str, Any]] | None = None  # for RAG templates
    tools: list[Tool] | None = None
    tool_choice: ToolChoice = None  # None: "auto" with tools, else "none" (OpenAI's and vLLM's defaults)
    parallel_tool_calls: bool | None = None  # False: tool_choice "required" makes exactly one call
    functions: list[Any] | None = None  # OpenAI's deprecated form of tools: refused, pointing to tools
    function_call: Any = None
    # Accepted and ignored: OpenAI features this engine does not have (text in, text out).
    reasoning_effort: str | None = None
    include_reasoning: bool | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _continue_or_generate(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: "
                             "set add_generation_prompt=false to continue the final message")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be from the assistant")
        return self

    def template_messages(self, content_format: str = "string") -> list[dict[str, Any]]:
        return [m.to_template(content_format) for m in self.messages]

    def echo_text(self) -> str:
        """What echo puts before the reply: the final message being continued."""
        return content_as_text(self.messages[-1].content) if self.echo and self.continue_final_message else ""

    # ---- tools ----
    def tool_choice_mode(self) -> str:
        """'none', 'auto', 'required' or 'named'."""
        if isinstance(self.tool_choice, dict):
            return "named"
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    def named_tool(self) -> str | None:
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None

    def template_tools(self, exclude_when_none: bool = False) -> list[dict[str, Any]] | None:
        """The tools for the chat template (vLLM's default: there even with tool_choice "none")."""
        if not self.tools or (exclude_when_none and self.tool_choice_mode() == "none"):
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def _check_tools(self) -> None:
        tools = self.tools or []
        names = [tool.function.name for tool in tools]
        mode = self.tool_choice_mode()
        if mode != "none" and not tools:
            raise APIError(f"tool_choice {self.tool_choice!r} needs tools", param="tool_choice")
        if mode == "named" and self.named_tool() not in names:
            raise APIError(f"tool_choice names the function '{self.named_tool()}', which is not among tools "
                           f"({', '.join(names)})", param="tool_choice")
        for i, tool in enumerate(tools):
            field = f"tools.{i}.function"
            if tool.function.name in names[:i]:
                raise APIError(f"{field}.name: '{tool.function.name}' is defined twice", param=f"{field}.name")
            if tool.function.parameters is not None:
                try:
                    check_spec(StructuredOutputsParams(json=tool.function.parameters), f"{field}.parameters")
                except ValueError as exc:
                    raise APIError(str(exc), param=f"{field}.parameters") from None

    def _forced_tool_calls(self) -> StructuredOutputsParams | None:
        mode = self.tool_choice_mode()
        tools = [tool.model_dump(exclude_none=True) for tool in self.tools or []]
        if mode == "required":
            return StructuredOutputsParams(json=required_calls_schema(tools, self.parallel_tool_calls is not False))
        if mode == "named":
            tool = next(t for t in tools if t["function"]["name"] == self.named_tool())
            return StructuredOutputsParams(json=named_call_schema(tool))
        return None

    # ---- conversion ----
    def _check_supported(self) -> None:
        super()._check_supported()
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise APIError(f"{name} is deprecated by OpenAI and not supported; use tools and tool_choice",
                               param=name)
        self._check_tools()
        if self.top_logprobs and not self.logprobs:
            raise APIError("top_logprobs requires logprobs=true", param="top_logprobs")

    def _constraints(self) -> dict[str, tuple[StructuredOutputsParams, str | None]]:
        constraints = super()._constraints()
        forced = self._forced_tool_calls()
        if forced is not None:
            constraints["tool_choice"] = (forced, "tools")
        return constraints

    def _requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, self.prompt_logprobs

    def _max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def _renamed_params(self) -> dict[str, str]:
        return {"max_tokens": self._max_tokens_param(), "logprobs": "top_logprobs",
                "prompt": "messages", "prompt_token_ids": "messages"}


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default; 0 only with echo (scoring)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool | None = False
    suffix: str | None = None  # fill-in-the-middle, for models with FIM tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (a string or a list of token ids each)."""
        if isinstance(self.prompt, str) or _is_token_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)

    def echo_only(self) -> bool:
        """echo with max_tokens=0 scores the prompt: its logprobs come back and nothing is
        generated (the engine samples one token, which is dropped, as vLLM does)."""
        return bool(self.echo) and self.max_tokens == 0

    def _check_supported(self) -> None:
        super()._check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise APIError("max_tokens=0 needs echo=true (it scores the prompt and generates nothing)",
                           param="max_tokens")

    def _requested_max_tokens(self) -> int | None:
        return 1 if self.echo_only() else self.max_tokens

    def _logprob_counts(self) -> tuple[int | None, int | None]:
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs
        return self.logprobs, prompt_logprobs

    def _renamed_params(self) -> dict[str, str]:
        return {"max_tokens": "max_tokens", "logprobs": "logprobs",
                "prompt_logprobs": "prompt_logprobs" if self.prompt_logprobs is not None else "logprobs"}


class TokenizeRequest(_ApiRequest):
    """Either {prompt, add_special_tokens} or {messages, add_generation_prompt, ...}."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages (the template has them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: TemplateKwargs = None
    tools: list[Tool] | None = None
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_ApiRequest):
    model: str | None = None
    tokens: list[int]


# ---- responses -------------------------------------------------------------------------------
def usage_info(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """cached_tokens None: no prompt_tokens_details (vLLM without --enable-prompt-tokens-details)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": None if cached_tokens is None else {"cached_tokens": cached_tokens},
    }


def response_envelope(object: str, id: str, created: int, model: str, choices: list[dict]) -> dict:
    """What chat.completion, chat.completion.chunk and text_completion bodies share."""
    return {"id": id, "object": object, "created": created, "model": model, "choices": choices}


def model_list(names: list[str], root: str, max_model_len: int, created: int, quantization: str) -> dict:
    return {"object": "list",
            "data": [model_card(name, root, max_model_len, created, quantization) for name in names]}


def model_card(name: str, root: str, max_model_len: int, created: int, quantization: str) -> dict:
    """A model object with vLLM's fields beyond OpenAI's (root, max_model_len) and the weights'
    quantization in use (`--quantization` resolved at load; vllm:cache_config_info names the KV
    cache dtype)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "sluice", "root": root,
            "max_model_len": max_model_len, "quantization": quantization}
