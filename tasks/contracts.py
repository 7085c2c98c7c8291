"""Typed contracts between the pipeline's stages: the one place where each boundary is defined.

Every model forbids unknown fields (a misspelled key is an error, never ignored) and every text
field that a stage needs is non-empty after stripping. The stage-recording wrapper validates a
stage's input on entry and its output on exit against these models, and stores their JSON form.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

STAGES: tuple[str, ...] = ("refine_lyrics", "generate_tags", "generate_tokens", "decode_audio", "encode_audio")
GPU_STAGES: frozenset[str] = frozenset({"generate_tokens", "decode_audio"})
PIPELINE_NAME = "heartmula-v1"  # the one code path; recorded with every job

FRAME_MS = 80  # 12.5 frames per second
MAX_SEED = 2**63 - 1
MAX_LYRICS_CHARS = 20_000
MAX_STYLE_CHARS = 1_000
MAX_TAGS = 32
TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_&'+-]*$")

LyricsBackend = Literal["rules", "llm", "off"]
TagsBackend = Literal["embedding", "llm", "given"]
OutputFormat = Literal["mp3", "wav"]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


NonEmptyText = Annotated[str, AfterValidator(_not_blank)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def normalise_tag(raw: str) -> str:
    """Lower-case, trim and join multi-word tags with '_' (HeartMuLa's convention: `bossa_nova`)."""
    tag = re.sub(r"\s+", "_", raw.strip().lower())
    tag = re.sub(r"_+", "_", tag).strip("_")
    if not tag:
        raise ValueError("a tag must not be empty")
    if not TAG_PATTERN.match(tag):
        raise ValueError(f"tag {raw!r} may only contain letters, digits, '_', '-', '&', '+' and apostrophes")
    return tag


def parse_tags(value: str | list[str]) -> list[str]:
    """Accept 'ska, upbeat,brass' or ['ska', 'upbeat']; return normalised, de-duplicated tags in order."""
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items or not any(isinstance(i, str) and i.strip() for i in items):
        raise ValueError("must contain at least one tag; omit the field to have tags generated")
    tags: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError("tags must be strings")
        if not item.strip():
            raise ValueError("contains an empty tag (check for doubled or trailing commas)")
        tag = normalise_tag(item)
        if tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    return tags


class GenerationParams(Contract):
    """Sampling parameters; defaults are the original service's (seed-story.md), shown on the form."""

    temperature: float = Field(1.0, gt=0, le=10)
    top_k: int = Field(50, ge=1, le=8197)
    cfg_scale: float = Field(1.5, ge=1, le=20)
    max_audio_length_ms: int = Field(240_000, ge=FRAME_MS)

    @property
    def max_frames(self) -> int:
        return self.max_audio_length_ms // FRAME_MS


class JobRequest(Contract):
    """What a user submits (form, JSON API, CLI). Stored verbatim (after validation) on the job."""

    lyrics: Annotated[NonEmptyText, Field(max_length=MAX_LYRICS_CHARS)]
    style: Annotated[str, Field(max_length=MAX_STYLE_CHARS)] | None = None
    tags: list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)] | None = None
    # strict: a boolean, a numeric string or 50.0 for an integer is refused, never coerced and stored
    temperature: float = Field(1.0, gt=0, le=10, strict=True)
    top_k: int = Field(50, ge=1, le=8197, strict=True)
    cfg_scale: float = Field(1.5, ge=1, le=20, strict=True)
    max_audio_length_ms: int = Field(240_000, ge=FRAME_MS, strict=True)
    output_format: OutputFormat = "mp3"
    lyrics_backend: LyricsBackend | None = None  # None: the deployment default, resolved at submission
    tags_backend: TagsBackend | None = None
    allow_fallback: bool = Field(False, strict=True)  # may a failed LLM backend fall back to the embedded one?

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: object) -> list[str] | None:
        if value is None:
            return None
        if not isinstance(value, (str, list)):
            raise ValueError("must be a comma-separated string or a list of strings")
        return parse_tags(value)

    @property
    def params(self) -> GenerationParams:
        return GenerationParams(temperature=self.temperature, top_k=self.top_k,
                                cfg_scale=self.cfg_scale, max_audio_length_ms=self.max_audio_length_ms)


class ArtifactRef(Contract):
    sha256: Sha256
    kind: Literal["tokens", "wav", "mp3", "pcm"]
    bytes: int = Field(ge=0)
    media_type: str


class LlmExchange(Contract):
    """The raw request and answer of one LLM call, recorded in full (never the API key)."""

    url: str
    model: str
    request: dict
    status: int | None = None
    answer: str | None = None
    error: str | None = None
    duration_s: float | None = None


# --- stage 1: lyrics refinement (CPU) ---------------------------------------------------------

class RefineLyricsInput(Contract):
    lyrics: NonEmptyText
    backend: LyricsBackend
    allow_fallback: bool
    max_frames: int = Field(ge=1)  # the song's frame budget; lyrics must leave room for it


class RefineLyricsOutput(Contract):
    lyrics: NonEmptyText
    backend_used: LyricsBackend
    fell_back: bool = False
    fallback_reason: str | None = None
    sections: list[str] = []
    removed_directions: list[str] = []
    direction_tags: list[str] = []
    estimated_prompt_tokens: int | None = None
    llm_exchanges: list[LlmExchange] = []


# --- stage 2: tags generation (CPU) -----------------------------------------------------------

class GenerateTagsInput(Contract):
    style: str | None
    user_tags: list[str] | None
    lyrics: NonEmptyText
    extra_tags: list[str] = []  # e.g. turned out of stage directions by stage 1
    backend: TagsBackend
    allow_fallback: bool


class GenerateTagsOutput(Contract):
    tags: Annotated[list[str], Field(min_length=1)]
    tags_string: NonEmptyText  # exactly what the token stage sends to the model
    backend_used: TagsBackend
    fell_back: bool = False
    fallback_reason: str | None = None
    scores: dict[str, float] = {}
    llm_exchanges: list[LlmExchange] = []

    @field_validator("tags")
    @classmethod
    def _tags_valid(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not TAG_PATTERN.match(tag):
                raise ValueError(f"invalid tag {tag!r}")
        return tags

    @field_validator("tags_string")
    @classmethod
    def _string_matches(cls, value: str, info) -> str:
        tags = info.data.get("tags")
        if tags is not None and value != ",".join(tags):
            raise ValueError("tags_string must be the tags joined by ',' without spaces")
        return value


# --- stage 3: music token generation (GPU) ----------------------------------------------------

class GenerateTokensInput(Contract):
    lyrics: NonEmptyText
    tags: NonEmptyText
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)]
    params: GenerationParams
    checkpoint: str  # the checkpoint folder the worker is configured with


class GenerateTokensOutput(Contract):
    tokens: ArtifactRef
    frames: int = Field(ge=1)
    stop_reason: Literal["eos", "max_length"]
    prompt_length: int = Field(ge=1)
    tags_text: str  # the exact strings that were tokenised
    lyrics_text: str
    device: str
    dtype: str
    batch_size: int = Field(1, ge=1)  # songs sharing the GPU batch: bit-identity on replay needs the same


# --- stage 4: codec decoding (GPU) ------------------------------------------------------------

class FollowedTokens(Contract):
    """A decode that started while its token stage was still generating (docs/streaming.md)."""

    attempt: int = Field(ge=1)  # the generate_tokens attempt running when the decode started
    max_frames: int = Field(ge=1)  # the song's longest length, which sizes the decode


class DecodeAudioInput(Contract):
    """The finished token grid, or (while streaming) the token stage it follows. A following decode
    records the grid it finally decoded here when it ends, so a replay reads plain tokens."""

    tokens: ArtifactRef | None = None
    frames: int | None = Field(None, ge=1)
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)]
    checkpoint: str
    follow: FollowedTokens | None = None

    @model_validator(mode="after")
    def _tokens_or_follow(self) -> DecodeAudioInput:
        if (self.tokens is None) != (self.frames is None):
            raise ValueError("tokens and frames go together")
        if self.tokens is None and self.follow is None:
            raise ValueError("tokens is required (or follow, for a decode that streams)")
        return self


class DecodeAudioOutput(Contract):
    wav: ArtifactRef
    sample_rate: Literal[48000]
    channels: Literal[2]
    samples: int = Field(ge=1)
    duration_s: float = Field(gt=0)
    device: str
    dtype: str
    peak_abs: float = Field(ge=0)
    clipped_samples: int = Field(ge=0)  # samples beyond +-1.0, clipped when written as 16-bit PCM


# --- stage 5: encoding (CPU) ------------------------------------------------------------------

class SongFileTags(Contract):
    """What the encoded file carries about itself (ID3 in MP3s), so a kept file still says what it is."""
    title: str
    job_id: str
    seed: int
    model_checksum: str | None = None
    label: str = "AI-generated"


class EncodeAudioInput(Contract):
    wav: ArtifactRef
    output_format: OutputFormat
    bitrate: str = "192k"
    file_tags: SongFileTags | None = None
    loudness_target_lufs: float | None = None  # None: loudness is measured, the audio left as decoded


class EncodeAudioOutput(Contract):
    audio: ArtifactRef
    wav: ArtifactRef
    output_format: OutputFormat
    duration_s: float = Field(gt=0)
    loudness_lufs: float | None = None  # integrated loudness (ITU-R BS.1770) of the decoded audio
    output_loudness_lufs: float | None = None  # after normalisation; equal to loudness_lufs when off
    gain_db: float = 0.0


STAGE_CONTRACTS: dict[str, tuple[type[Contract], type[Contract]]] = {
    "refine_lyrics": (RefineLyricsInput, RefineLyricsOutput),
    "generate_tags": (GenerateTagsInput, GenerateTagsOutput),
    "generate_tokens": (GenerateTokensInput, GenerateTokensOutput),
    "decode_audio": (DecodeAudioInput, DecodeAudioOutput),
    "encode_audio": (EncodeAudioInput, EncodeAudioOutput),
}
