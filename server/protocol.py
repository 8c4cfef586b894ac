"""Pydantic models of the OpenAI API subset Press speaks, plus its diffusion extensions.

Only request and response shapes live here; turning a request into engine work is serving.py's job.
Unknown request fields are accepted and ignored, as the OpenAI spec grows faster than any server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr

from server.best_of import MAX_BEST_OF

# OpenAI's seed is an int64.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _json_number(value: object) -> object:
    """A JSON number, as the document's `number` says: pydantic's lax float would take true/false and "0.5"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be a number")
    return value


def _json_integer(value: object) -> object:
    """A JSON Schema integer: an int, or a number with no fractional part (9.0), but not a boolean or a string."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("Input should be an integer")
    return value


JSON_INTEGER = BeforeValidator(_json_integer)
Integer = Annotated[int, JSON_INTEGER]
PositiveInteger = Annotated[int, Field(ge=1), JSON_INTEGER]
# A stop sequence, as the engine takes it (engine/sampling_params.py).
StopString = Annotated[StrictStr, Field(min_length=1, max_length=256)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX, json_schema_extra={"format": "int64"}), JSON_INTEGER]


# A float field's last metadata (after its Field, so the bounds still reach the JSON schema): JSON numbers only
# (integers included), not booleans or numeric strings.
JSON_NUMBER = BeforeValidator(_json_number)
Number = Annotated[float, JSON_NUMBER]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False
    # Press extension: one chunk per refinement pass carrying a `draft` object (default on).
    include_drafts: StrictBool = True
    # Press extension: drafts also carry every canvas position's token text and whether this pass accepted it
    # (what the playground draws as a grid of cells).
    include_draft_tokens: StrictBool = False


class JSONSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`. `schema` is kept as given; the grammar engine judges it."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """Press extension, named as vLLM names it: exactly one of a JSON schema, a regex, a list of choices, a
    grammar (Lark as llguidance reads it; GBNF is converted), or `json_object: true`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: StrictStr  # a data: URL (PNG, JPEG, WebP, GIF) or an http(s) URL the server fetches
    # Accepted and ignored, as vLLM does: the checkpoint's processor decides the resolution.
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]
    image_url: ImageURL


class OtherPart(BaseModel):
    """Audio and file parts (and refusals): parsed so the error can name them, then rejected."""

    model_config = ConfigDict(extra="allow")
    type: Literal["input_audio", "file", "refusal"]


ContentPart = Annotated[TextPart | ImagePart | OtherPart, Field(discriminator="type")]


class Infill(BaseModel):
    """Press extension: the answer is this template, its strings fixed and its holes filled by the model."""

    model_config = ConfigDict(extra="forbid")
    # Strings and {"hole": N} objects, checked one by one (server/infill.py) so an error names the segment.
    template: Annotated[list[Any], Field(min_length=1)]


class Prediction(BaseModel):
    """OpenAI's Predicted Outputs: text the answer is expected to resemble (canvases start from it)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["content"]
    content: StrictStr | list[ContentPart]


class DiffusionParams(BaseModel):
    """Sampling fields shared by both endpoints (OpenAI's plus the diffusion extensions)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: Annotated[int, Field(ge=1), JSON_INTEGER] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = None
    seed: (
        Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX, json_schema_extra={"format": "int64"}), JSON_INTEGER] | None
    ) = None
    temperature: Annotated[float, Field(ge=0, le=2), JSON_NUMBER] | None = None
    top_p: Annotated[float, Field(gt=0, le=1), JSON_NUMBER] | None = None
    n: Annotated[int, Field(ge=1, le=16), JSON_INTEGER] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    # OpenAI's completions parameter, on both endpoints: rows per prompt, the n most confident answer.
    best_of: Annotated[int, Field(ge=1, le=MAX_BEST_OF), JSON_INTEGER] | None = None
    # Accepted for compatibility; they have no diffusion counterpart and are ignored.
    presence_penalty: Annotated[float, Field(ge=-2, le=2), JSON_NUMBER] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2), JSON_NUMBER] | None = None
    # Rejected with a clear error when set to something we cannot honour (see serving.reject_unsupported).
    logit_bias: dict[str, Number] | None = None
    # Diffusion extensions.
    denoising_steps: Annotated[int, Field(ge=1, le=1024), JSON_INTEGER] | None = None
    entropy_bound: Annotated[float, Field(gt=0), JSON_NUMBER] | None = None
    t_min: Annotated[float, Field(ge=0, le=10), JSON_NUMBER] | None = None
    t_max: Annotated[float, Field(ge=0, le=10), JSON_NUMBER] | None = None
    stability_threshold: Annotated[int, Field(ge=0, le=1024), JSON_INTEGER] | None = None
    confidence_threshold: Annotated[float, Field(gt=0), JSON_NUMBER] | None = None
    # As in vLLM: keep denoising canvases past EOS until max_tokens (benchmarks, load tests).
    ignore_eos: StrictBool = False
    # Structured outputs (both endpoints): OpenAI's response_format, or vLLM's structured_outputs.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Canvas constraints: a template with fixed text and holes (Press), a prediction (OpenAI).
    infill: Infill | None = None
    prediction: Prediction | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr
    arguments: StrictStr  # a JSON object, as text (OpenAI's shape)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: StrictStr | None = None  # tool turns: the call they answer


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(DiffusionParams):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1), JSON_INTEGER] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), JSON_INTEGER] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    # Extra variables for the chat template, e.g. {"enable_thinking": true} (as vLLM accepts them).
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(DiffusionParams):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | Annotated[list[Integer], Field(min_length=1)]
        | Annotated[list[Annotated[list[Integer], Field(min_length=1)]], Field(min_length=1)]
    )
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    # Press extension for `suffix`: the middle lengths to try (default: max_tokens, then halves; see README).
    middle_lengths: (
        Annotated[list[Annotated[int, Field(ge=1), JSON_INTEGER]], Field(min_length=1, max_length=8)] | None
    ) = None
    # Alternatives per token (OpenAI allows up to 5 here; Press, like vLLM, up to 20).
    logprobs: Annotated[int, Field(ge=0, le=20), JSON_INTEGER] | None = None


# ---------------------------------------------------------------- responses


class CompletionTokensDetails(BaseModel):
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class Draft(BaseModel):
    """Press extension on stream chunks: one refinement pass of the canvas being denoised."""

    canvas_index: int
    pass_index: int
    text: str
    accepted_fraction: float
    mean_entropy: float
    # Character spans [start, end) of `text` holding fixed tokens (infill templates, fill-in-the-middle suffixes).
    fixed_spans: list[tuple[int, int]] | None = None
    # Which candidate row this draft belongs to: a fill-in-the-middle length (see README, Fill-in-the-middle) or a
    # best_of candidate.
    candidate: int | None = None
    hole: int | None = None
    # With stream_options.include_draft_tokens: per canvas position, the argmax token's text and whether this
    # pass accepted it, and the positions a template fixed.
    tokens: list[str] | None = None
    accepted: list[int] | None = None
    fixed: list[int] | None = None


class BestOfCandidate(BaseModel):
    # The mean log-probability of the answer's tokens in the verification passes over its finished canvases, each
    # token scored in the pass that hid it (engine/verify.py), then the lowest and the mean at the passes that
    # committed them (null for an empty answer): ranked by the first, ties by the second, then the third.
    verified_logprob: float | None
    min_logprob: float | None
    mean_logprob: float | None
    passes: int
    completion_tokens: int
    finish_reason: str


class BestOfStats(BaseModel):
    """The candidate rows a best_of choice was picked from (all of its prompt's), and which one it is."""

    chosen: int
    candidates: list[BestOfCandidate]


class DiffusionStats(BaseModel):
    """Press extension on a finished choice: how the answer was denoised."""

    canvases: int
    passes: int
    tokens_per_forward: float
    best_of: BestOfStats | None = None  # with best_of > n or reasoning_effort high


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    # The model's thinking, under both names clients read: vLLM's `reasoning`, DeepSeek's `reasoning_content`.
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None = None
    diffusion: DiffusionStats | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None
    diffusion: DiffusionStats | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    draft: Draft | None = None
    diffusion: DiffusionStats | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (documentation of the stream; see server/openapi.py)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    draft: Draft | None = None
    diffusion: DiffusionStats | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "press"
    max_model_len: int
    canvas_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody
