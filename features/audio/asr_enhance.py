"""ASR enhancement in the `asr` stage (paper 002), off by default: `asr.enhance` in params.yaml.

`select`: transcribe both the raw audio and the denoised audio and keep, per clip, the hypothesis
the decoder is more confident in (`features.audio.asr.select_hypothesis`: the higher average token
log-probability; denoising helps on some clips and garbles others). `rewrite`: an optional LLM
step after it. The text encoders then read the enhanced transcripts like any others.

The rewrite: a local causal LM (transformers folder, or a folder + GGUF file) reads the candidate transcripts of
one utterance (raw-audio and denoised ASR) and writes the sentence it thinks was spoken, greedily, so
a rerun gives the same text. Small LMs invent words, so a guard keeps the ASR text when the rewrite
changes more than `max_change` of its words (word edit distance / words) or comes back empty;
every entry records whether the rewrite was kept. The model and settings are part of the ASR cache
key (`fingerprint`), and no downloaded code runs unless `trust_remote_code` is set.

Imports go one way: this module builds on `features.audio.asr`, which holds the whole `asr` params
section (`EnhanceConfig`, `RewriteConfig` included) and the scoring and selection of hypotheses.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

# EnhanceConfig and RewriteConfig are imported from here too: they live with AsrConfig.
from features.audio.asr import (EnhanceConfig, RewriteConfig, select_hypothesis, transcribe_scored,
                                word_errors)
from features.cache import versions
from features.params import resolve_model_path
from features.errors import ConfigError, ModelLoadError
from features.cache.hashcache import sha256_file

INSTRUCTION = ("You fix speech recognition errors. The candidates below are automatic transcripts of "
               "one spoken English sentence. Reply with the sentence that was most likely spoken, "
               "and nothing else.")


def prompt_text(candidates: list[str], instruction: str = "") -> str:
    lines = [f"Candidate {i}: {c or '(nothing heard)'}" for i, c in enumerate(candidates, 1)]
    return (instruction or INSTRUCTION) + "\n\n" + "\n".join(lines)


def first_sentence(generated: str) -> str:
    """The reply's first non-empty line, without a 'Candidate n:'/'Sentence:' label or quotes."""
    line = next((x for x in generated.splitlines() if x.strip()), "")
    # a short lead-in ending in a colon ('Sentence:', 'The most likely spoken sentence is:')
    line = re.sub(r"^[^:\"“]{0,60}:\s*(?=\S)", "", line)
    return re.sub(r"\s+", " ", line).strip().strip('"“”\'').strip()


def change_ratio(before: str, after: str) -> float:
    """Word edit distance from `before` to `after` over the words of `before` (1.0 for empty)."""
    edits, words = word_errors(before, after)
    return edits / words if words else float(bool(after.strip()))


def fingerprint(cfg: RewriteConfig) -> dict:
    """Settings and weight hashes of the rewrite model, without loading it."""
    path = Path(resolve_model_path(cfg.model))
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise ConfigError(f"asr.enhance.rewrite.model {cfg.model!r}: no such folder. Give a local causal LM "
                          "folder (config.json, tokenizer, weights) or a folder holding a GGUF, or set it "
                          'to "" to turn the rewrite off.')
    if path.is_file():
        files = [path]
    elif cfg.gguf_file:
        files = [folder / cfg.gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix in versions.WEIGHT_SUFFIXES)
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise ConfigError(f"asr.enhance.rewrite.model {cfg.model!r}: no weights found "
                          f"({missing or 'no weight files'}); check the folder and gguf_file.")
    settings = {k: v for k, v in vars(cfg).items() if k != "device"}
    return {**settings, "weights": {f.name: sha256_file(f) for f in files},
            "model_files": versions.model_files(folder), "prompt": cfg.instruction or INSTRUCTION}


class Rewriter:
    """The loaded rewrite model; `rewrite(candidates, asr_text)` -> (text, kept_the_rewrite)."""

    def __init__(self, cfg: RewriteConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.torch = cfg, torch
        path = resolve_model_path(cfg.model)
        common = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.gguf_file:
            common["gguf_file"] = cfg.gguf_file
        elif any(Path(path).glob("*.safetensors")):
            common["use_safetensors"] = True  # prefer safetensors (no pickle) when the folder has them
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **common)
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **common)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(f"asr.enhance.rewrite.model {cfg.model!r}: cannot load a causal LM and its "
                                 f"tokenizer ({err}). Give a local folder saved with save_pretrained, or a "
                                 "folder + gguf_file.") from err
        missing = [k for k in info.get("missing_keys", ()) if "lm_head" not in k]  # tied heads are fine
        if missing:
            raise ModelLoadError(f"asr.enhance.rewrite.model {cfg.model!r}: {len(missing)} weights are not in "
                                 f"the checkpoint (e.g. {missing[:3]}) and would be random. Use the complete "
                                 "model folder.")
        self.model = model.to(cfg.device).eval()

    def _encode(self, candidates: list[str]):
        text = prompt_text(candidates, self.cfg.instruction)
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, return_tensors="pt")
            ids = ids if self.torch.is_tensor(ids) else ids["input_ids"]
        else:
            ids = self.tokenizer(text + "\nSentence:", return_tensors="pt").input_ids
        return ids.to(self.cfg.device)

    def generate(self, candidates: list[str]) -> str:
        ids = self._encode(candidates)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.cfg.max_new_tokens, pad_token_id=pad)
        return first_sentence(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    def rewrite(self, candidates: list[str], asr_text: str) -> tuple[str, bool]:
        """The rewrite if the guard accepts it, else `asr_text`; and whether it was accepted."""
        new = self.generate(candidates)
        if not new or change_ratio(asr_text, new) > self.cfg.max_change:
            return asr_text, False
        return new, True


def verdict(kept: bool) -> str:
    """What a transcripts entry records of the rewrite."""
    return "kept" if kept else "refused by the guard"


def enhance_fingerprint(cfg: EnhanceConfig) -> dict:
    return {"select": cfg.select, "rewrite": fingerprint(cfg.rewrite) if cfg.rewrite.on else None}


class Enhancer:
    """Hypotheses of one clip -> its transcripts.json entry (text, source, hypotheses, rewrite)."""

    def __init__(self, backend, cfg: EnhanceConfig):
        self.backend, self.cfg = backend, cfg
        self.rewriter = Rewriter(cfg.rewrite) if cfg.rewrite.on else None

    def transcribe(self, clip_id: str, denoised: np.ndarray, raw: np.ndarray | None) -> dict:
        hyps = [transcribe_scored(self.backend, raw, clip_id, "raw")] if raw is not None else []
        hyps.append(transcribe_scored(self.backend, denoised, clip_id, "denoised"))
        best = select_hypothesis(hyps)
        entry = {"text": best.text, "source": best.source,
                 "hypotheses": [{**asdict(h), "avg_logprob": _finite(h.avg_logprob)} for h in hyps]}
        if self.rewriter is not None:
            text, kept = self.rewriter.rewrite(list(dict.fromkeys(h.text for h in hyps)), best.text)
            entry.update(text=text, rewrite=verdict(kept))
            entry["source"] += "+llm" if kept else ""
        return entry


def _finite(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 6)


def rewrite_all(cases: dict[str, tuple[list[str], str]], cfg: RewriteConfig, path: Path) -> dict[str, dict]:
    """clip -> {"text", "rewrite"} for `cases` (clip -> (candidates, ASR text)), cached in `path` by
    the candidates and the rewrite fingerprint; the model loads only if a clip is left to do."""
    from tqdm import tqdm

    from features.reliability.reports import read_json, write_json_atomic
    from features.storage.store import clip_key

    fp = fingerprint(cfg)
    old = read_json(path)["rewrites"] if path.is_file() else {}
    keys = {c: clip_key("asr-rewrite", cands, text, fp) for c, (cands, text) in cases.items()}
    done = {c: old[c] for c, k in keys.items() if old.get(c, {}).get("key") == k}
    todo = [c for c in cases if c not in done]
    rewriter = Rewriter(cfg) if todo else None
    for c in tqdm(todo, desc="llm rewrite", unit="clip", disable=not todo):
        text, kept = rewriter.rewrite(*cases[c])
        done[c] = {"text": text, "rewrite": verdict(kept), "key": keys[c]}
    write_json_atomic(path, {"rewrites": done})
    return done
