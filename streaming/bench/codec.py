"""``mimo-voice bench codec``: what streaming costs in accuracy and latency, on the configured audio tokenizer.

Speech (espeak-ng by default, or ``--wav``) is encoded once; its codes are then

* decoded by :class:`StreamingDecoder` one 4-frame patch at a time, for each look-ahead, and compared with the
  offline decode of the whole utterance (one chunk). Per look-ahead: error (max |diff|, SNR), the frames that
  must exist before the first PCM, the compute time of that first chunk and of later pushes, and the first-PCM
  latency when patches arrive at real time (160 ms each): ``patches needed x 160 ms + first-chunk compute``.
  A ``full`` row (look-ahead = the whole utterance) checks that streaming reproduces the offline decode;
* decoded with several left contexts at the configured look-ahead;
* and the audio is encoded by :class:`IncrementalEncoder` in 20 ms pieces for several chunk/overlap settings,
  counting the codes that differ from encoding the whole utterance at once, and the end-of-turn cost
  (:meth:`IncrementalEncoder.finish`) next to encoding the whole utterance.

With the random-weight ``tiny`` preset the figures describe the mechanism, not the official model's quality;
note also that its 2-layer vocoder sees only ~6 frames ahead where the official 16-layer one sees 41.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from mimo_voice.configs import Config
from mimo_voice.streaming.engine.codec_stream import IncrementalEncoder, StreamingDecoder
from mimo_voice.streaming.engine.events import SAMPLE_RATE, SAMPLES_PER_FRAME, SAMPLES_PER_PATCH
from mimo_voice.streaming.model.audio import resample
from mimo_voice.streaming.model.checkpoint import pick_device, pick_dtype
from mimo_voice.streaming.model.modeling_audio_tokenizer import (
    MiMoAudioTokenizer,
    load_audio_tokenizer,
    write_tiny_tokenizer,
)

from .report import ProgressBar, Table, add_json_argument, print_tables, summarize, write_json

PATCH_FRAMES = SAMPLES_PER_PATCH // SAMPLES_PER_FRAME
PATCH_MS = 1000 * SAMPLES_PER_PATCH / SAMPLE_RATE
PIECE_SECS = 0.02  # live input arrives in 20 ms frames
SENTENCES = (
    "Hello, thanks for calling. How can I help you today? "
    "I would like to change the delivery address of my last order, please. "
    "Of course. Could you tell me the order number and the new address?"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo-voice bench codec", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokenizer", help="tokenizer checkpoint (default: model.tokenizer_path, else the tiny preset)"
    )
    parser.add_argument("--wav", help="speech file to use instead of espeak-ng speech (any rate; channels averaged)")
    parser.add_argument("--synthetic", action="store_true", help="use a synthetic speech-like signal (no espeak-ng)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the utterance (default: 10)")
    parser.add_argument("--lookaheads", default="0,2,4,8,16,40", help="look-aheads in frames (default: 0,2,4,8,16,40)")
    parser.add_argument("--left-contexts", default="0,8,24,48,100", help="left contexts in frames for the second table")
    parser.add_argument(
        "--encode",
        default="0.5:0.25,1:0.5,2:0.5,2:1,4:0.5",
        help="incremental encode settings as chunk:overlap seconds (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_json_argument(parser)
    return parser


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if any(v < 0 for v in values):
        raise ValueError(f"frame counts must be >= 0: {text}")
    return values


def _encode_settings(text: str) -> list[tuple[float, float]]:
    pairs = [[float(x) for x in item.split(":")] for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"--encode takes chunk:overlap pairs, got {text!r}")
    return [(chunk, overlap) for chunk, overlap in pairs]


# -- inputs ----------------------------------------------------------------------------------------------
def load_tokenizer(config: Config, path: str | None, workdir: Path) -> MiMoAudioTokenizer:
    device = pick_device(config.model.device)
    dtype = pick_dtype(config.model.dtype, device)
    source = path or config.model.tokenizer_path or write_tiny_tokenizer(workdir / "tiny_tokenizer", config.model.seed)
    return load_audio_tokenizer(source, device=device, dtype=dtype)


def synthetic_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding 120-220 Hz pitch under a 4 Hz syllable envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    pitch = 170 + 50 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    return (0.1 * envelope * voiced + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def espeak_speech(seconds: float, workdir: Path) -> np.ndarray:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise FileNotFoundError("espeak-ng is not installed; pass --wav FILE or --synthetic")
    path = workdir / "speech.wav"
    subprocess.run([espeak, "-w", str(path), SENTENCES], check=True, capture_output=True)
    return _fit(read_speech(path), seconds)


def read_speech(path: str | Path) -> np.ndarray:
    """A sound file as 24 kHz mono float32."""
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), rate, SAMPLE_RATE)


def _fit(audio: np.ndarray, seconds: float) -> np.ndarray:
    """Repeat or cut to ``seconds``."""
    if not audio.size:
        raise ValueError("the speech file holds no audio")
    n = int(SAMPLE_RATE * seconds)
    return np.tile(audio, -(-n // audio.size))[:n]


# -- measurements ----------------------------------------------------------------------------------------
def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def measure_streaming_decode(
    tokenizer: MiMoAudioTokenizer, codes: torch.Tensor, offline: torch.Tensor, left_context: int, lookahead: int
) -> dict:
    """Stream ``codes`` patch by patch and compare with ``offline`` (the whole-utterance decode)."""
    decoder = StreamingDecoder(tokenizer, left_context, lookahead)
    pieces, push_ms, first = [], [], None
    for index, start in enumerate(range(0, codes.shape[0], PATCH_FRAMES)):
        pcm, seconds = _timed(decoder.push, codes[start : start + PATCH_FRAMES])
        pieces.append(pcm)
        if pcm.numel():
            push_ms.append(1000 * seconds)
            first = first or (index + 1, 1000 * seconds)
    rest, seconds = _timed(decoder.flush)
    first = first or (len(pieces), 1000 * seconds)
    error = torch.cat(pieces + [rest]) - offline
    error_energy = float(error.pow(2).sum())
    total_s = sum(push_ms) / 1000 + seconds
    return {
        "left_context_frames": left_context,
        "lookahead_frames": lookahead,
        "max_abs_error": float(error.abs().max()),
        "snr_db": 10 * math.log10(float(offline.pow(2).sum()) / error_energy) if error_energy else None,  # None: exact
        "frames_before_first_pcm": min(first[0] * PATCH_FRAMES, codes.shape[0]),
        "first_chunk_ms": first[1],
        "first_pcm_at_realtime_ms": first[0] * PATCH_MS + first[1],
        "push_ms": summarize(push_ms[1:]),
        "rtf": total_s / (codes.shape[0] * tokenizer.samples_per_frame / SAMPLE_RATE),
    }


def measure_incremental_encode(
    tokenizer: MiMoAudioTokenizer, wav: np.ndarray, whole: torch.Tensor, chunk_secs: float, overlap_secs: float
) -> dict:
    """Encode ``wav`` in 20 ms pieces and compare with ``whole`` (the whole-utterance codes)."""
    encoder = IncrementalEncoder(tokenizer, chunk_secs, overlap_secs, n_q=whole.shape[1])
    piece = int(SAMPLE_RATE * PIECE_SECS)
    outputs, busy = [], 0.0
    for start in range(0, wav.size, piece):
        codes, seconds = _timed(encoder.push, wav[start : start + piece])
        outputs.append(codes)
        busy += seconds
    rest, finish_s = _timed(encoder.finish)
    codes = torch.cat(outputs + [rest])
    differ = codes != whole
    return {
        "chunk_secs": chunk_secs,
        "overlap_secs": overlap_secs,
        "frames": codes.shape[0],
        "frames_differing": int(differ.any(dim=1).sum()),
        "codes_differing": int(differ.sum()),
        "codebook0_differing": int(differ[:, 0].sum()),
        "encode_rtf": (busy + finish_s) / (wav.size / SAMPLE_RATE),
        "finish_ms": 1000 * finish_s,
    }


# -- tables ----------------------------------------------------------------------------------------------
def decode_table(title: str, rows: list[dict]) -> Table:
    table = Table(
        title,
        [
            "left ctx",
            "look-ahead",
            "look-ahead ms",
            "max |err|",
            "SNR dB",
            "frames before PCM",
            "first chunk ms",
            "first PCM @1x ms",
            "push p50 ms",
            "push p90 ms",
            "RTF",
        ],
    )
    for row in rows:
        table.add_row(
            row["left_context_frames"],
            row["label"],
            row["lookahead_frames"] * 40,
            f"{row['max_abs_error']:.1e}",
            "exact" if row["snr_db"] is None else row["snr_db"],
            row["frames_before_first_pcm"],
            row["first_chunk_ms"],
            row["first_pcm_at_realtime_ms"],
            row["push_ms"]["p50"],
            row["push_ms"]["p90"],
            row["rtf"],
        )
    return table


def encode_table(rows: list[dict], whole_ms: float) -> Table:
    table = Table(
        f"Incremental encode vs whole-utterance encode ({whole_ms:.0f} ms for the whole utterance)",
        [
            "chunk s",
            "overlap s",
            "frames",
            "frames differing %",
            "codes differing %",
            "codebook 0 differing %",
            "encode RTF",
            "finish ms",
        ],
    )
    for row in rows:
        frames = row["frames"]
        table.add_row(
            row["chunk_secs"],
            row["overlap_secs"],
            frames,
            100 * row["frames_differing"] / frames,
            100 * row["codes_differing"] / (frames * 8),
            100 * row["codebook0_differing"] / frames,
            row["encode_rtf"],
            row["finish_ms"],
        )
    return table


def main(config: Config, argv: list[str]) -> int:
    argv = list(argv)
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `bench codec -- --seconds 5`
    try:
        lookaheads, contexts = _int_list(args.lookaheads), _int_list(args.left_contexts)
        settings = _encode_settings(args.encode)
        if args.seconds <= 0.1:
            raise ValueError("--seconds must be more than 0.1")
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = load_tokenizer(config, args.tokenizer, Path(tmp))
            if args.threads:
                torch.set_num_threads(args.threads)
            if args.wav:
                wav = _fit(read_speech(args.wav), args.seconds)
            else:
                wav = synthetic_speech(args.seconds) if args.synthetic else espeak_speech(args.seconds, Path(tmp))
            return run(config, args, tokenizer, wav, lookaheads, contexts, settings)
    except (ValueError, OSError, soundfile.SoundFileError, subprocess.CalledProcessError) as exc:
        print(f"mimo-voice bench codec: {exc}", file=sys.stderr)  # CheckpointError is a ValueError
        return 2


def run(
    config: Config,
    args: argparse.Namespace,
    tokenizer: MiMoAudioTokenizer,
    wav: np.ndarray,
    lookaheads: list[int],
    contexts: list[int],
    settings: list[tuple[float, float]],
) -> int:
    whole, whole_s = _timed(tokenizer.encode, torch.from_numpy(wav))
    codes = whole[: tokenizer.decode_chunk_frames]
    offline = tokenizer.decode(codes).cpu()
    default_left = config.streaming.decode_left_context_frames
    default_ahead = config.streaming.decode_lookahead_frames
    runs = [(default_left, la, str(la)) for la in lookaheads] + [(default_left, codes.shape[0], "full")]
    runs += [(left, default_ahead, str(default_ahead)) for left in contexts]
    decode_rows: list[dict[str, Any]] = []
    context_rows: list[dict[str, Any]] = []
    encode_rows: list[dict[str, Any]] = []
    with ProgressBar(len(runs) + len(settings), "bench codec") as progress:
        for index, (left, ahead, label) in enumerate(runs):
            row = {**measure_streaming_decode(tokenizer, codes, offline, left, ahead), "label": label}
            (decode_rows if index <= len(lookaheads) else context_rows).append(row)
            progress.advance(note=f"decode left {left} ahead {label}")
        for chunk, overlap in settings:
            encode_rows.append(measure_incremental_encode(tokenizer, wav, whole, chunk, overlap))
            progress.advance(note=f"encode {chunk}:{overlap}")
    seconds = codes.shape[0] * tokenizer.samples_per_frame / SAMPLE_RATE
    tables = [
        decode_table(
            f"Streaming decode vs offline decode ({seconds:.1f} s, left context {default_left} frames)", decode_rows
        ),
        decode_table(f"Streaming decode vs left context (look-ahead {default_ahead} frames)", context_rows),
        encode_table(encode_rows, 1000 * whole_s),
    ]
    print_tables(tables)
    if args.json:
        payload = {
            "tokenizer": args.tokenizer or config.model.tokenizer_path or "tiny",
            "device": str(tokenizer.device),
            "audio_seconds": wav.size / SAMPLE_RATE,
            "threads": torch.get_num_threads(),
            "decode": decode_rows,
            "left_context": context_rows,
            "encode": encode_rows,
            "whole_encode_ms": 1000 * whole_s,
        }
        write_json(args.json, payload, command="mimo-voice bench codec", tables=tables)
    return 0
