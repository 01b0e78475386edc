"""
Audio in and out: every clip becomes 16 kHz mono int16, the input HuBERT expects.

load_audio reads PCM and IEEE float WAV with the standard library's `wave`; anything else (MELD
ships .mp4) is first decoded by the ffmpeg command-line tool (the one on PATH, or the one the
imageio-ffmpeg package ships) to a float WAV on a pipe, at its native rate and channels, so there
is one reader, and mixing to mono and resampling happen in one place.
Float samples that are NaN or infinite are refused, never stored as full-scale clicks.
"""
import io
import os
import shutil
import subprocess
import wave

import numpy as np
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # HuBERT's receptive field (25 ms): a shorter clip cannot be encoded
RATES = (1000, 768000)  # the sample rates a WAV header may say, in Hz


class AudioError(ValueError):
    """A file that is missing, empty, truncated or cannot be decoded; the message names it."""


class NoFFmpeg(RuntimeError):
    """Media other than PCM WAV needs the ffmpeg command-line tool, and it is not installed: a problem
    of the machine, not of the file, so --skip-bad does not skip it."""

# -----------------------------------------------------------------------------
# reading and writing

def for_wave(data):
    """A WAV file's bytes, edited so that the standard library's wave (Python 3.11) reads them
    -> (bytes, whether the samples are IEEE float). wave reads plain PCM only, and trusts the data
    chunk's size, so:
    - WAVE_FORMAT_EXTENSIBLE (tag 0xFFFE, which ffmpeg writes for more than 2 channels, above 48 kHz
      or for float) takes its sub-format's tag, the first two bytes of its GUID, 24 bytes into the
      fmt chunk's body;
    - IEEE float (tag 3), 32 or 64 bits, is relabelled PCM: wave hands over its bytes unread;
    - a WAV streamed to a pipe (ffmpeg ... pipe:1) cannot go back to write its sizes: it leaves them
      0xFFFFFFFF, "to the end of the file"; the data chunk's size becomes what the file holds.
    Anything else is left for wave to read, or to refuse."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return data, False
    streamed, is_float, i = data[4:8] == b"\xff\xff\xff\xff", False, 12
    while i + 8 <= len(data):  # the chunks: 4-byte id, 4-byte size, the body (padded to even)
        kind, size = data[i:i + 4], int.from_bytes(data[i + 4:i + 8], "little")
        if kind == b"fmt " and size >= 16:
            tag, bits = data[i + 8:i + 10], int.from_bytes(data[i + 22:i + 24], "little")
            if tag == b"\xfe\xff" and size >= 26:
                tag = data[i + 32:i + 34]
            is_float = tag == b"\x03\x00" and bits in (32, 64)
            if tag == b"\x01\x00" or is_float:
                data = data[:i + 8] + b"\x01\x00" + data[i + 10:]
        elif kind == b"data":
            held = len(data) - i - 8
            if size == 0xFFFFFFFF or streamed and size > held:
                data = data[:i + 4] + min(held, 0xFFFFFFFF).to_bytes(4, "little") + data[i + 8:]
            break
        i += 8 + size + size % 2
    return data, is_float


def read_wav(data, name):
    """A PCM or IEEE float WAV file's bytes -> (float32 samples, [-1, 1) for PCM, of shape
    (frames, channels), rate). name: the file, for errors."""
    data, is_float = for_wave(data)
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except wave.Error as e:
        if str(e).startswith("unknown format"):
            raise  # valid but neither PCM nor float (e.g. A-law): load_audio hands it to ffmpeg
        raise AudioError(f"{name}: corrupt WAV file ({e})") from None
    except EOFError:
        raise AudioError(f"{name}: corrupt WAV file (header cut short)") from None
    if n == 0:
        raise AudioError(f"{name}: empty WAV file (0 frames)")
    if not RATES[0] <= rate <= RATES[1]:  # (0 Hz would divide by zero, 4 GHz fill the memory resampling)
        raise AudioError(f"{name}: corrupt WAV file (its header says {rate} samples a second, audio has "
                         f"{RATES[0]:,} to {RATES[1]:,})")
    got = len(raw) // (channels * width)  # the header's frame count is only a promise
    if got < n:
        raise AudioError(f"{name}: truncated WAV file (header says {n} frames, file holds {got})")
    if is_float:
        x = np.frombuffer(raw, f"<f{width}")
        if not np.isfinite(x).all():
            raise AudioError(f"{name}: has non-finite samples (NaN or inf)")
    elif width == 1:  # 8-bit WAV is unsigned, centred on 128
        x = (np.frombuffer(raw, np.uint8) - 128.0) / 2**7
    elif width == 2:
        x = np.frombuffer(raw, "<i2") / 2**15
    else:  # 24 or 32 bits, little-endian: each sample becomes the top bytes of an int32
        b = np.zeros((n * channels, 4), np.uint8)
        b[:, 4 - width:] = np.frombuffer(raw, np.uint8).reshape(-1, width)
        x = b.view("<i4")[:, 0] / 2**31
    return x.astype(np.float32).reshape(n, channels), rate


def ffmpeg_command():
    """The ffmpeg command-line tool: the one on PATH, else the one the imageio-ffmpeg package ships
    (`pip install imageio-ffmpeg`; requirements-dev.txt installs it), else None"""
    if found := shutil.which("ffmpeg"):
        return found
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):  # not installed, or a package without its binary
        return None


def decode_with_ffmpeg(path):
    """Any media ffmpeg reads -> read_wav's output, through a 32-bit float WAV on a pipe (no file to
    leave behind; float: NaN and inf reach read_wav, which refuses them, rather than full scale)."""
    if (ffmpeg := ffmpeg_command()) is None:
        raise NoFFmpeg(f"reading {path} needs the ffmpeg command-line tool, which is neither on PATH nor "
                       "installed by pip: `pip install imageio-ffmpeg` (a wheel with the binary), or "
                       "`apt-get install ffmpeg`, `brew install ffmpeg`")
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", path, "-vn", "-acodec", "pcm_f32le", "-f", "wav", "pipe:1"]
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        last = (r.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise AudioError(f"{path}: ffmpeg cannot decode it ({last})")
    return read_wav(r.stdout, path)


def load_audio(path, max_seconds=None):
    """Any audio or video file -> (16 kHz mono int16 samples, whether max_seconds cut it)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such file")
    if path.lower().endswith(".wav"):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:  # permission denied, say
            raise AudioError(f"{path}: cannot read it ({e.strerror})") from None
        try:
            x, rate = read_wav(data, path)
        except wave.Error:
            x, rate = decode_with_ffmpeg(path)
    else:
        x, rate = decode_with_ffmpeg(path)
    x = torch.from_numpy(x.mean(axis=1))  # (frames,) mono
    if rate != SAMPLE_RATE:
        x = AF.resample(x, rate, SAMPLE_RATE)
    samples = (x.numpy() * 2**15).round().clip(-2**15, 2**15 - 1).astype(np.int16)
    was_cut = max_seconds is not None and len(samples) > max_seconds * SAMPLE_RATE
    if was_cut:
        samples = samples[:int(max_seconds * SAMPLE_RATE)]
    return samples, was_cut


def save_wav(path, samples, rate=SAMPLE_RATE):
    """Mono int16 samples -> a 16-bit WAV (prepare.py writes its clips in a folder it swaps in whole)."""
    samples = np.asarray(samples)
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise ValueError(f"save_wav wants 1-D int16 samples, got {samples.dtype} of shape {samples.shape}")
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
