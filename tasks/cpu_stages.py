"""The CPU stages as Celery tasks: each is its compute function wrapped by the recording wrapper."""
from __future__ import annotations

from tasks import audio_files
from tasks.contracts import (
    EncodeAudioInput,
    EncodeAudioOutput,
    GenerateTagsInput,
    GenerateTagsOutput,
    RefineLyricsInput,
    RefineLyricsOutput,
)
from tasks.recording import StageContext, stage_task
from tasks.stage_inputs import RESOLVERS


def refine_lyrics(inp: RefineLyricsInput, ctx: StageContext) -> RefineLyricsOutput:
    from tasks.lyrics_refinement import refine_lyrics as refine

    return refine(inp, ctx.settings)


def generate_tags(inp: GenerateTagsInput, ctx: StageContext) -> GenerateTagsOutput:
    from tasks.tags_generation import generate_tags as generate

    return generate(inp, ctx.settings)


def encode_audio(inp: EncodeAudioInput, ctx: StageContext) -> EncodeAudioOutput:
    wav = ctx.store.get(inp.wav.sha256, inp.wav.kind)
    loudness = audio_files.normalise_loudness(wav, inp.loudness_target_lufs)
    encoded = audio_files.encode(loudness.wav, inp.output_format, inp.bitrate)
    if inp.output_format == "mp3" and inp.file_tags is not None:
        encoded = audio_files.tag_mp3(encoded, **inp.file_tags.model_dump())
    audio = ctx.put_artifact(encoded, inp.output_format)
    samples = audio_files.decoded_samples(wav)
    return EncodeAudioOutput(audio=audio, wav=inp.wav, output_format=inp.output_format,
                             duration_s=samples / audio_files.SAMPLE_RATE, loudness_lufs=loudness.measured_lufs,
                             output_loudness_lufs=loudness.output_lufs, gain_db=loudness.gain_db)


refine_lyrics_task = stage_task("refine_lyrics", RESOLVERS["refine_lyrics"], refine_lyrics)
generate_tags_task = stage_task("generate_tags", RESOLVERS["generate_tags"], generate_tags)
encode_audio_task = stage_task("encode_audio", RESOLVERS["encode_audio"], encode_audio)
