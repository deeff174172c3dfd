"""LoRA on the top layers of an encoder, trained from the cached states of the layer below (paper 000).

The embed stage keeps frame-level states for `layers_frames`; if hidden state `first - 1` is one
of them, the blocks that make hidden states `first..last` can be trained and run from those cached
frames alone: the frozen lower layers (and the conv front end, the mel/feature extraction, the
token embeddings) never run again. `LayerStack` knows, per architecture, which blocks those are,
how to call them (masks, rotary positions) and whether the last hidden state carries a final norm.

Training (`train_folds`): seeded k-fold on the manifest's folds. Fold k's adapter (LoRA on the
blocks' `target_modules` + a linear classifier on the mean-pooled last adapted state) trains on
the labelled clips outside fold k. A fold model is kept as its trained tensors only
(`FoldModels.states`; the frozen blocks are the base's), so the stages save and reload them.
Featurising (`featurise`) is separate, for any clips: only fold k's model writes the adapted
features of fold k's labelled clips (out-of-fold); every other clip (unlabelled, test, new) gets
the mean over the fold models. `adapt_features` does both in memory. The frozen base runs in eval
mode (no dropout, no layer drop), so the cached path computes exactly what the whole model would
(tests/models/adapt/test_adapt.py checks the loss trajectory).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from tqdm.auto import tqdm

from features.cache import versions
from features.errors import ConfigError
from models.training.cv import class_weights  # also imported from here (tests, benchmarks)
from models.training.train_config import CLASSES

@dataclass
class AdaptConfig:
    """params.yaml `adapt.<name>`: one adapted feature store made from one encoder's store."""

    encoder: str  # the embed.encoders entry (its store holds the prefix frames)
    layers: Any = "best"  # [first, last] hidden states to adapt, or "best" (probe's best layer)
    span: int = 2  # layers: best -> the `span` layers ending at the probe's best layer
    rank: int = 4  # LoRA rank
    alpha: float = 8.0  # LoRA scaling numerator (scale = alpha / rank)
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # [] = the architecture's attention projections
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    max_frames: int = 0  # > 0: training crops longer clips to a seeded random window of this many frames
    pooling: str = "mean"  # mean | last (causal LMs: the last valid token)
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    dtype: str = "float32"  # float32 | bfloat16 | float16: autocast dtype on a GPU (CPU: float32)
    gradient_checkpointing: bool = False  # recompute each block in backward (less memory on a GPU)
    write_frames: bool = False  # also store the last adapted layer's frames (frame-level heads)


# ----------------------------------------------------------------------------- layer stacks
@dataclass
class LayerStack:
    """The transformer blocks of a loaded model, and how to run a run of them on cached states.

    Hidden state i (0 = the input of block 0) is block i-1's output; `final_norm`, when set, is
    part of the last hidden state (pre-LN stacks: Whisper, HuBERT-large, Llama).
    """

    blocks: nn.ModuleList
    final_norm: nn.Module | None
    config: Any
    kind: str  # "bidirectional" | "causal"
    rotary: nn.Module | None = None

    @property
    def num_hidden(self) -> int:
        return len(self.blocks) + 1

    def _attention(self, h: Tensor, mask: Tensor) -> tuple[Any, dict]:
        from transformers import masking_utils

        if self.kind == "bidirectional":
            return masking_utils.create_bidirectional_mask(
                config=self.config, inputs_embeds=h, attention_mask=mask.long()), {}
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
        attn = masking_utils.create_causal_mask(config=self.config, inputs_embeds=h,
                                                attention_mask=mask.long(), cache=None, position_ids=pos)
        return attn, {"position_ids": pos, "position_embeddings": self.rotary(h, position_ids=pos)}


def layer_stack(model: nn.Module) -> LayerStack:
    """The LayerStack of a loaded encoder model (an `Encoder.model` or its text backbone)."""
    config = model.config
    if hasattr(model, "layers") and hasattr(model, "embed_positions"):  # Whisper encoder
        probe = {"input_features": _ramp(1, config.num_mel_bins, 2 * config.max_source_positions)}
        return LayerStack(model.layers, _norm_if_in_states(model, model.layer_norm, probe), config,
                          "bidirectional")
    if hasattr(model, "layers") and hasattr(model, "rotary_emb"):  # Llama-family decoder stack
        probe = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}
        return LayerStack(model.layers, _norm_if_in_states(model, model.norm, probe), config, "causal",
                          model.rotary_emb)
    base = getattr(model, "base_model", model)
    if base is not model:
        return layer_stack(base)
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layers") and hasattr(config, "do_stable_layer_norm"):
        if "wavlm" in type(model).__name__.lower():
            raise ConfigError("adapt: WavLM's layers share relative position biases; use HuBERT or wav2vec2.")
        # post-LN stacks normalise before the first block: nothing to add after the last
        norm = encoder.layer_norm if config.do_stable_layer_norm else None
        probe = {"input_values": _ramp(1, 16_000)}
        return LayerStack(encoder.layers, norm and _norm_if_in_states(model, norm, probe), config,
                          "bidirectional")
    raise ConfigError(f"adapt: no layer stack known for {type(model).__name__}; supported are "
                      f"HuBERT/wav2vec2, Whisper encoders and Llama-family causal LMs.")


def _ramp(*shape: int) -> Tensor:
    """A deterministic, non-constant probe input (constant inputs can make a norm an identity)."""
    n = int(np.prod(shape))
    return torch.sin(torch.arange(n, dtype=torch.float32) * 0.37).reshape(shape)


def _norm_if_in_states(model: nn.Module, norm: nn.Module, probe: dict) -> nn.Module | None:
    """`norm` if the model's last hidden state includes its final norm, else None.

    transformers versions differ (5.x leaves it out for HuBERT-large, keeps it for Whisper and
    Llama), so one tiny forward pass asks the loaded model itself."""
    param = next(model.parameters())
    probe = {k: v.to(param.device, v.dtype if v.dtype == torch.long else param.dtype) for k, v in probe.items()}
    with torch.no_grad():
        out = model(**probe, output_hidden_states=True)
    return norm if torch.equal(out.hidden_states[-1], out.last_hidden_state) else None


def _tensor(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


DEFAULT_TARGETS = {"bidirectional": ["q_proj", "v_proj"], "causal": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def resolve_layers(cfg: AdaptConfig, num_hidden: int, best_layer: int | None) -> tuple[int, int]:
    """(first, last) hidden states to adapt, 1 <= first <= last < num_hidden."""
    if cfg.layers == "best":
        if best_layer is None:
            raise ConfigError("adapt: layers: best needs the probe's best.json; give layers: [first, last].")
        last = max(int(best_layer), 1)
        first = max(1, last - int(cfg.span) + 1)
    elif isinstance(cfg.layers, (list, tuple)) and len(cfg.layers) == 2:
        first, last = (int(v) % num_hidden for v in cfg.layers)
    else:
        raise ConfigError(f"adapt: layers {cfg.layers!r}: use [first, last] (hidden-state indices) or best.")
    if not 1 <= first <= last < num_hidden:
        raise ConfigError(f"adapt: layers {cfg.layers!r} -> {first}..{last}; the model has hidden states "
                          f"0..{num_hidden - 1} and 0 (the embeddings output) cannot be adapted.")
    return first, last


# ----------------------------------------------------------------------------- the model
class Adapter(nn.Module):
    """A LoRA copy of blocks first..last plus a linear classifier on their pooled last state."""

    def __init__(self, stack: LayerStack, first: int, last: int, cfg: AdaptConfig, n_classes: int):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.stack, self.first, self.pooling = stack, first, cfg.pooling
        self.blocks = copy.deepcopy(nn.ModuleList(stack.blocks[first - 1:last]))
        self.final_norm = copy.deepcopy(stack.final_norm) if last == stack.num_hidden - 1 else None
        self.blocks.requires_grad_(False)
        if self.final_norm is not None:
            self.final_norm.requires_grad_(False)
        targets = list(cfg.target_modules) or DEFAULT_TARGETS[stack.kind]
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none")
        try:
            inject_adapter_in_model(lora, self.blocks)
        except ValueError as err:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in self.blocks.named_modules()
                            if isinstance(m, nn.Linear)})
            raise ConfigError(f"adapt: LoRA target_modules {targets} match no module of the adapted "
                              f"layers ({err}); their linear modules are named {names}.") from err
        for name, param in self.blocks.named_parameters():
            param.requires_grad_("lora_" in name)
        dim = int(getattr(stack.config, "hidden_size", 0) or stack.config.d_model)
        self.classifier = nn.Linear(dim, n_classes)

    def collate(self, items: Sequence[np.ndarray], device: torch.device,
                rng: np.random.Generator | None = None, max_frames: int = 0) -> tuple[Tensor, Tensor]:
        """Cached prefix frames [T_i, D] -> a padded batch (training crops to max_frames)."""
        if rng is not None:
            items = [crop(f, max_frames, rng) for f in items]
        return pad(items, device)

    def states(self, h: Tensor, mask: Tensor, checkpoint: bool = False) -> tuple[list[Tensor], Tensor]:
        """Adapted hidden states first..last from the cached hidden state first-1 `h`, and the mask."""
        return run_blocks(self.stack, self.blocks, self.final_norm, h, mask, checkpoint), mask

    def pooled(self, h: Tensor, mask: Tensor) -> Tensor:
        return pool(h, mask, self.pooling)

    def forward(self, *batch: Tensor, checkpoint: bool = False) -> Tensor:
        states, mask = self.states(*batch, checkpoint=checkpoint)
        return self.classifier(self.pooled(states[-1], mask))

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def run_blocks(stack: LayerStack, blocks: Sequence[nn.Module], final_norm: nn.Module | None,
               h: Tensor, mask: Tensor, checkpoint: bool = False) -> list[Tensor]:
    """Each block's output from `h` [B, T, D] (right-padded, `mask` [B, T] bool); `final_norm`
    (if any) is applied to the last one, as the model does to its last hidden state."""
    attn, extra = stack._attention(h, mask)
    outs = []
    for block in blocks:
        call = lambda x, b=block: _tensor(b(x, attention_mask=attn, **extra))  # noqa: E731
        h = torch.utils.checkpoint.checkpoint(call, h, use_reentrant=False) if checkpoint else call(h)
        outs.append(h)
    if final_norm is not None:
        outs[-1] = final_norm(outs[-1])
    return outs


def pool(h: Tensor, mask: Tensor, how: str) -> Tensor:
    m = mask.to(h.dtype).unsqueeze(-1)
    if how == "mean":
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "last":
        return h[torch.arange(h.shape[0], device=h.device), mask.long().sum(1) - 1]
    raise ConfigError(f"adapt: pooling {how!r}; use mean or last.")


def count_parameters(base: nn.Module, adapter: Adapter) -> dict:
    """Trainable (LoRA + classifier) against the whole base encoder's parameters."""
    trainable = sum(p.numel() for p in adapter.trainable())
    total = sum(p.numel() for p in base.parameters()) + trainable
    return {"trainable": int(trainable), "total": int(total), "trainable_share": trainable / total}


# ----------------------------------------------------------------------------- batches
def pad(frames: Sequence[np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    """[T_i, D] arrays -> right-padded [B, T, D] float32 and its [B, T] bool mask."""
    width = max(len(f) for f in frames)
    x = np.zeros((len(frames), width, frames[0].shape[1]), np.float32)
    mask = np.zeros((len(frames), width), bool)
    for i, f in enumerate(frames):
        x[i, : len(f)], mask[i, : len(f)] = f, True
    return torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)


def crop(frames: np.ndarray, max_frames: int, rng: np.random.Generator) -> np.ndarray:
    if max_frames <= 0 or len(frames) <= max_frames:
        return frames
    start = int(rng.integers(0, len(frames) - max_frames + 1))
    return frames[start : start + max_frames]


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if device.type == "cuda" and dtype in half:
        return torch.autocast("cuda", dtype=half[dtype])
    if dtype not in ("float32", *half):
        raise ConfigError(f"adapt: dtype {dtype!r}; use float32, bfloat16 or float16.")
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- training
@dataclass
class FoldResult:
    losses: list[float]  # mean training loss per epoch
    pooled: dict[str, np.ndarray]  # clip -> [n_adapted, D]
    frames: dict[str, np.ndarray]  # clip -> [T, D] of the last adapted layer (write_frames)
    probs: dict[str, np.ndarray]  # held-out clip -> class probabilities


def train_adapter(adapter: Adapter, frames: Sequence[np.ndarray], y: np.ndarray, cfg: AdaptConfig,
                  device: torch.device, seed: int, step: Callable[[], None] | None = None) -> list[float]:
    """Train LoRA + classifier on cached prefix frames; mean loss per epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    adapter.to(device).train(False)  # frozen base: eval mode (no dropout / layer drop)
    for m in adapter.modules():  # only LoRA's own dropout (cfg.lora_dropout) is active
        if hasattr(m, "lora_dropout"):
            m.lora_dropout.train(True)
    opt = torch.optim.AdamW(adapter.trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y, len(CLASSES)).to(device))
    losses = []
    for _ in range(cfg.epochs):
        order, total = rng.permutation(len(frames)), 0.0
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            batch = adapter.collate([frames[r] for r in rows], device, rng, cfg.max_frames)
            with autocast(device, cfg.dtype):
                logits = adapter(*batch, checkpoint=cfg.gradient_checkpointing)
            loss = loss_fn(logits.float(), torch.from_numpy(y[rows]).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
            if step:
                step()
        losses.append(total / len(frames))
    return losses


def size(item: Any) -> int:
    return sum(len(part) for part in item) if isinstance(item, tuple) else len(item)


@torch.no_grad()
def adapted_features(adapter: Adapter, frames: Sequence[np.ndarray], cfg: AdaptConfig,
                     device: torch.device) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Per clip: pooled adapted states [n_adapted, D], last-layer frames [T, D], class probabilities."""
    adapter.train(False)
    pooled, last, probs = [], [], []
    order = sorted(range(len(frames)), key=lambda i: size(frames[i]))  # little padding
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start : start + cfg.batch_size]
        with autocast(device, cfg.dtype):
            states, mask = adapter.states(*adapter.collate([frames[r] for r in rows], device))
        states = [s.float() for s in states]
        vec = torch.stack([adapter.pooled(s, mask) for s in states], dim=1)
        p = torch.softmax(adapter.classifier(vec[:, -1]), -1)
        for j, r in enumerate(rows):
            pooled.append((r, vec[j].cpu().numpy()))
            last.append((r, states[-1][j, : int(mask[j].sum())].cpu().numpy()))
            probs.append((r, p[j].cpu().numpy()))
    unsort = lambda pairs: [v for _, v in sorted(pairs, key=lambda t: t[0])]  # noqa: E731
    return np.stack(unsort(pooled)), unsort(last), np.stack(unsort(probs))


# ----------------------------------------------------------------------------- fold models
@dataclass
class FoldModels:
    """The K fold models as their trained tensors: one module runs each fold's in turn (a fold
    model is the frozen blocks, the same for every fold, plus its own trained tensors)."""

    folds: list[int]
    states: list[dict[str, Tensor]]  # per fold: LoRA, classifier (and projector) tensors, on the CPU
    module: Adapter | None = None  # the last trained fold's module, reused to featurise (None: build one)
    losses: list[list[float]] = field(default_factory=list)  # per fold, per epoch
    oof_probs: dict[str, np.ndarray] = field(default_factory=dict)  # labelled clip -> held-out probabilities
    parameters: dict = field(default_factory=dict)  # trainable count and share


def trained_state(module: Adapter) -> dict[str, Tensor]:
    """What training changed (the trainable tensors), copied to the CPU."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_state(module: Adapter, state: dict[str, Tensor]) -> None:
    """Put one fold's trained tensors into `module` (their names must be exactly its trainable ones)."""
    params = dict(module.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(state) != wanted:
        raise ConfigError(f"adapt: saved tensors {sorted(set(state) ^ wanted)[:4]} do not fit the module "
                          f"these settings build; the weights were saved by other code or settings.")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def weights_digest(states: Sequence[dict[str, Tensor]]) -> str:
    """Hash of the fold tensors' values: features made by other weights get other cache keys."""
    h = hashlib.sha256()
    for state in states:
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_folds(base: nn.Module, cfg: AdaptConfig, items: dict[str, Any], labels: dict[str, int],
                folds: dict[str, int], device: torch.device, build: Callable[[], Adapter]) -> FoldModels:
    """Train one model per fold on the labelled clips outside it (`items`: at least those clips'
    inputs); each fold's held-out clips give its out-of-fold class probabilities."""
    fold_ids = sorted({folds[c] for c in labels})
    if len(fold_ids) < 2:
        raise ConfigError(f"adapt: need labelled clips in at least 2 folds, have folds {fold_ids}.")
    models = FoldModels(fold_ids, [])
    steps = len(fold_ids) * cfg.epochs * sum(-(-sum(folds[c] != k for c in labels) // cfg.batch_size)
                                             for k in fold_ids[:1])
    bar = tqdm(total=steps, desc="adapt", unit="batch", disable=steps < 2)
    for k in fold_ids:
        torch.manual_seed(cfg.seed + k)
        module = build()
        if not models.parameters:
            models.parameters = count_parameters(base, module)
        train = [c for c in labels if folds[c] != k]
        held = [c for c in labels if folds[c] == k]
        y = np.array([labels[c] for c in train], np.int64)
        models.losses.append(train_adapter(module, [items[c] for c in train], y, cfg, device,
                                           cfg.seed + k, bar.update))
        if held:
            _, _, probs = adapted_features(module, [items[c] for c in held], cfg, device)
            models.oof_probs.update(zip(held, probs))
        models.states.append(trained_state(module))
        models.module = module
    bar.close()
    return models


# Clips whose inputs are in memory at once when featurising. A group of at most this many is
# batched exactly as one call over it would be (padding decides float rounding): a store made in
# one run, such as the demo's, keeps its numbers.
CHUNK = 1024


def featurise(module: Adapter, models: FoldModels, ids: Sequence[str], fold_of: dict[str, int],
              load: Callable[[str], Any], cfg: AdaptConfig,
              device: torch.device) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(clip, pooled [n_adapted, D], last-layer frames [T, D]) for each of `ids`, chunk by chunk.

    The fold policy: a labelled clip of fold k (`fold_of`) gets fold k's model, the one that never
    trained on it; every other clip gets the mean over the fold models (summed in fold order)."""
    module.to(device)
    wanted = set(ids)
    for k, state in zip(models.folds, models.states):
        held = [c for c in fold_of if fold_of[c] == k and c in wanted]
        if held:
            load_state(module, state)
        for chunk in chunks(held):
            pooled, last, _ = adapted_features(module, [load(c) for c in chunk], cfg, device)
            yield from zip(chunk, pooled, last)
    for chunk in chunks([c for c in ids if c not in fold_of]):
        yield from zip(chunk, *fold_mean(module, models, [load(c) for c in chunk], cfg, device))
    load_state(module, models.states[-1])  # leave a trained module as it was trained


def chunks(ids: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]


def fold_mean(module: Adapter, models: FoldModels, items: Sequence[Any], cfg: AdaptConfig,
              device: torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """The mean over the fold models of each item's pooled states and last-layer frames."""
    pooled_sum, frame_sums = None, None
    for state in models.states:
        load_state(module, state)
        pooled, last, _ = adapted_features(module, items, cfg, device)
        pooled_sum = pooled if pooled_sum is None else pooled_sum + pooled
        frame_sums = last if frame_sums is None else [a + b for a, b in zip(frame_sums, last)]
    n = len(models.states)
    return pooled_sum / n, [f / n for f in frame_sums]


@dataclass
class AdaptResult:
    pooled: dict[str, np.ndarray]  # every clip -> [n_adapted, D] (out-of-fold / fold mean)
    frames: dict[str, np.ndarray]  # every clip -> [T, D] when write_frames
    oof_probs: dict[str, np.ndarray]  # labelled clip -> its held-out adapter's class probabilities
    losses: list[list[float]]  # per fold, per epoch
    parameters: dict  # trainable count and share
    source: dict = field(default_factory=dict)  # which adapter made which clip's features


def adapt_features(stack: LayerStack, base: nn.Module, first: int, last: int, cfg: AdaptConfig,
                   frames: dict[str, Any], labels: dict[str, int], folds: dict[str, int],
                   device: torch.device, make_adapter: Callable[[], Adapter] | None = None) -> AdaptResult:
    """Train one adapter per fold and write every clip's features out-of-fold, all in memory.

    `frames`: the inputs (prefix states) of every clip; `labels`/`folds`: the labelled clips
    (fold >= 0). A labelled clip of fold k gets only fold k's adapter (never trained on it);
    every other clip gets the mean of all fold adapters' features.
    """
    build = make_adapter or (lambda: Adapter(stack, first, last, cfg, len(CLASSES)))
    models = train_folds(base, cfg, frames, labels, folds, device, build)
    result = AdaptResult({}, {}, models.oof_probs, models.losses, models.parameters)
    fold_of = {c: folds[c] for c in labels}
    for cid, pooled, last_frames in featurise(models.module, models, list(frames), fold_of,
                                              frames.__getitem__, cfg, device):
        result.pooled[cid], result.frames[cid] = pooled, last_frames
        result.source[cid] = [fold_of[cid]] if cid in fold_of else models.folds
    return result


def training_digest(cfg: AdaptConfig, base_fp: dict, keys: dict[str, str], labels: dict[str, int],
                    folds: dict[str, int], first: int, last: int, stage: str = "adapt") -> str:
    """Everything an adapted clip's features depend on: settings, base weights, the prefix
    states and labels/folds of every training clip (one change retrains every adapter), and
    the source of `stage`'s code with the versions of torch, peft and transformers."""
    blob = json.dumps({"cfg": asdict(cfg), "base": base_fp, "first": first, "last": last,
                       "train": sorted((c, keys[c], labels[c], folds[c]) for c in labels),
                       "code": versions.fingerprint(stage)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
