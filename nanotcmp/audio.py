"""
Audio in and out: every clip becomes 16 kHz mono int16, the input HuBERT expects.

load_audio reads PCM and IEEE float WAV with the standard library's `wave`; anything else (MELD
ships .mp4) is first decoded by the ffmpeg command-line tool to a float WAV on a pipe, at its native
rate and channels, so there is one reader, and mixing to mono and resampling happen in one place.
Float samples that are NaN or infinite are refused, never stored as full-scale clicks. synthesize
makes the speech-like clips of the synthetic corpus.
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


def decode_with_ffmpeg(path):
    """Any media ffmpeg reads -> read_wav's output, through a 32-bit float WAV on a pipe (no file to
    leave behind; float: NaN and inf reach read_wav, which refuses them, rather than full scale)."""
    if shutil.which("ffmpeg") is None:
        raise NoFFmpeg(f"reading {path} needs the ffmpeg command-line tool, which is not on PATH: "
                           "install it with `apt-get install ffmpeg`, `brew install ffmpeg` or "
                           "`conda install -c conda-forge ffmpeg`")
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-vn", "-acodec", "pcm_f32le", "-f", "wav", "pipe:1"]
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
    """Mono int16 samples -> a 16-bit WAV, written whole or not at all (via path.tmp)."""
    samples = np.asarray(samples)
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise ValueError(f"save_wav wants 1-D int16 samples, got {samples.dtype} of shape {samples.shape}")
    tmp = os.fspath(path) + ".tmp"
    with wave.open(tmp, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# a speech-like synthesiser: glottal pulses shaped by formant resonances (a source-filter model)

# formants F1..F3 of an adult male voice (Peterson & Barney, 1952) and a typical F4, which keeps
# some energy above F3; Hz
VOWELS = np.array([
    [730, 1090, 2440, 3500],  # a, "father"
    [530, 1840, 2480, 3500],  # e, "bed"
    [270, 2290, 3010, 3500],  # i, "beet"
    [570, 840, 2410, 3500],   # o, "bought"
    [300, 870, 2240, 3500],   # u, "boot"
], dtype=np.float64)
BANDWIDTHS = np.array([80.0, 100.0, 150.0, 250.0])  # Hz, of F1..F4


def glottal_flow(phase):
    # Rosenberg's glottal pulse, phase in [0, 1) of a pitch period: the vocal folds open over 40% of
    # the period, snap shut over 16%, and stay shut for the rest
    opening = 0.5 * (1 - np.cos(np.pi * phase / 0.4))
    closing = np.cos(np.pi * (phase - 0.4) / 0.32)
    return np.where(phase < 0.4, opening, np.where(phase < 0.56, closing, 0.0))


def formant_gain(freqs, formants):
    # magnitude response of a cascade of 2-pole resonators (as in Klatt's synthesiser): 1 at DC,
    # about F/B at each formant F, falling off above the last; freqs (K,), formants (4,) -> (K,)
    f = freqs[:, None]
    return np.prod(formants**2 / np.sqrt((formants**2 - f**2)**2 + (f * BANDWIDTHS)**2), axis=1)


def synthesize(n_syllables, pitch_hz, energy, tempo, timbre, rng):
    """
    A speech-like utterance of n_syllables voiced syllables and short pauses -> 16 kHz int16.
    pitch_hz: the mean fundamental; energy: loudness (the RMS is proportional to it); tempo: speed
    (1 = about 0.18 s per syllable); timbre: the speaker's vocal tract, one scaling per formant
    (F1, F2, F3; a shorter tuple repeats its last value; F4 follows F3). Deterministic given rng.
    """
    if not 1 <= len(timbre) <= 3:
        raise ValueError(f"timbre must hold 1 to 3 formant scalings, got {len(timbre)}")
    scale = np.array(list(timbre) + [timbre[-1]] * (4 - len(timbre)), dtype=np.float64)
    n = n_syllables
    # all prosody is drawn first, so that changing pitch_hz, energy or timbre changes nothing else
    durs = 0.18 / tempo * rng.uniform(0.75, 1.25, n)  # (n,) seconds
    # a pause after about 40% of syllables, as between words; within a word syllables run together
    gaps = rng.uniform(0.03, 0.12, n) * (rng.uniform(0, 1, n) < 0.4) / tempo  # (n,) seconds
    drift = rng.uniform(-0.25, 0.1)  # pitch change from first to last syllable: mostly falling
    f0 = pitch_hz * (1 + drift * (np.linspace(0, 1, n) - 0.5)) * rng.uniform(0.92, 1.08, n)  # (n,)
    glide = rng.uniform(-0.1, 0.1, n)  # pitch rise or fall within each syllable
    vowels = rng.integers(len(VOWELS), size=n)
    stress = rng.uniform(0.6, 1.0, n)
    phase0 = rng.uniform(0, 1, n)

    pieces = [np.zeros(int(0.05 * SAMPLE_RATE))]
    for i in range(n):
        m = int(durs[i] * SAMPLE_RATE)
        t = np.arange(m) / m  # (m,) position within the syllable, 0..1
        phase = phase0[i] + np.cumsum(f0[i] * (1 + glide[i] * (t - 0.5))) / SAMPLE_RATE
        flow = glottal_flow(phase % 1)
        envelope = np.sin(np.pi * t) ** 0.5  # the syllable's rise and fall
        voiced = np.diff(flow, prepend=flow[0])  # the lips radiate the flow's derivative
        voiced *= envelope / (voiced.std() + 1e-8)
        # breath noise, with a burst at the onset like a /t/ or /h/, so syllables start with a consonant
        breath = rng.standard_normal(m) * (0.05 * envelope + 0.8 * np.exp(-t * durs[i] / 0.012))
        # zero padding keeps the resonances' ringing from wrapping around; a power of 2 is fastest
        nfft = 1 << (m + 512).bit_length()
        spec = np.fft.rfft(voiced + breath, nfft)
        spec *= formant_gain(np.fft.rfftfreq(nfft, 1 / SAMPLE_RATE), VOWELS[vowels[i]] * scale)
        syllable = np.fft.irfft(spec, nfft)[:m]
        pieces.append(syllable * stress[i] / (np.sqrt(np.mean(syllable**2)) + 1e-8))
        pieces.append(np.zeros(int(gaps[i] * SAMPLE_RATE)))
    x = 0.1 * energy * np.concatenate(pieces)  # RMS of a syllable: 0.1 * energy * stress
    x += 0.0005 * rng.standard_normal(len(x))  # a quiet room
    return (x * 2**15).round().clip(-2**15, 2**15 - 1).astype(np.int16)
