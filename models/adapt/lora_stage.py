"""The `adapt@<name>` stage: LoRA adapters from an encoder's cached prefix frames -> a new feature store.

Reads `artifacts/features/<encoder>` (the prefix layer's frames), the manifest's labels and folds,
and (for `layers: best`) the probe's best.json; writes `artifacts/features/<name>` (pooled adapted
layers first..last, optionally the last layer's frames) that any head names like an encoder,
`report.json` (trainable parameters, loss per fold and epoch, the adapters' own out-of-fold
scores, time) and the trained fold adapters. The base encoder is loaded only to take its top
blocks; its weights must be the ones the store was made with (fingerprints compared), or the
stage refuses.

Saved weights (shared with joint@, models/adapt/joint_stage.py): `<report folder>/trained/` holds
`fold-<k>.safetensors` per fold (the trained tensors only: LoRA, classifier, projector; never the
base model) and `record.json`: the training digest (`training_digest`: settings, base
fingerprint, the labelled clips' keys, labels and folds, code and library versions), the fold
files' sha256, a digest of their values (`weights`), the base stores' fingerprints, the settings,
the encoder settings, the store meta, and the training summary. A rerun whose digest equals the
record's loads the saved folds and never retrains: adding unlabelled clips featurises only them.
Clip keys hold the digest and the weights' digest, so a store never mixes features of two
trainings (a GPU retrain is not bit-reproducible).

Apply only (`mer predict` on new videos):

    apply_saved(name, cfg, trained_dir, features_dir, ids, out_dir, enc_cfg=None) -> Path

loads the saved fold adapters and their record from `trained_dir` (`artifacts/adapt/<name>/trained`),
checks that `cfg` (the params.yaml entry; `device` may differ), the code and library versions and
the fingerprint of the base store `<features_dir>/<cfg.encoder>` match the record (a MerError
names the store and the fix otherwise), and writes the adapted features of `ids` (clips of that
base store, all treated as unlabelled: the mean over the fold adapters) into the store `out_dir`,
with the stage store's meta. `enc_cfg` (the base encoder's settings) defaults to those recorded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from features.cache import versions
from features.encoders import EncoderConfig, load_encoder
from features.errors import ConfigError, MerError, ModelLoadError
from features.media.manifest import read_manifest
from features.reliability.reports import write_json_atomic
from features.storage.record import StoreRecord
from features.storage.store import StoreReader, StoreUpdate, clip_key
from features.encoders.base import pick_device
from models.adapt.lora import (CHUNK, Adapter, AdaptConfig, FoldModels, LayerStack, featurise, layer_stack,
                               resolve_layers, train_folds, training_digest, weights_digest)
from models.training.train_config import CLASSES
from models.evaluation.metrics import compute_metrics

TRAINED = "trained"  # the saved fold models' folder, inside the stage's report folder
RECORD = "record.json"
RECORD_FORMAT = "mer-trained-transform/1"
# Base-store fingerprint keys apply-only lets differ from the record: the precision the same
# weights ran in (a CPU predict of a GPU-embedded project), how the store pools (adapters read
# frames) and which frames it keeps (`prefix_index` checks the one needed).
TOLERATED = ("dtype", "pooling", "layers_frames")


def base_model(encoder) -> "torch.nn.Module":  # noqa: F821
    """The module whose blocks are adapted: a causal LM's decoder stack, else the model."""
    return getattr(encoder, "backbone", None) or encoder.model


def base_config(enc_cfg: EncoderConfig, dtype: str, device) -> EncoderConfig:
    """The base loads on the CPU (only the adapted blocks move to the device): fp32 for CPU
    training, the training dtype (bf16 weights, fp32 LoRA) for a GPU."""
    return dataclasses.replace(enc_cfg, device="cpu", dtype=dtype if device.type == "cuda" else "float32")


def check_base(name: str, source: str, meta: dict, encoder) -> dict:
    """Refuse a base model whose weights differ from those the prefix store was made with."""
    stored = dict(meta.get("fingerprint") or {})
    now = encoder.fingerprint()
    differ = [k for k in ("family", "weights") if stored.get(k) != now.get(k)]
    if differ:
        raise ModelLoadError(
            f"adapt@{name}: the {source!r} model's {differ} differ from the store it adapts "
            f"(store {[stored.get(k) for k in differ]}, model now {[now.get(k) for k in differ]}); "
            f"its cached frames came from other weights. Rerun `dvc repro embed@{source}` first.")
    return {k: now.get(k) for k in ("family", "model", "weights", "code_version")}


def prefix_index(name: str, source: str, meta: dict, prefix: int, num_hidden: int) -> int:
    """Where hidden state `prefix` sits among the store's frame-level layers (or a ConfigError)."""
    stored = [int(v) % num_hidden for v in (meta.get("layers_frames") or [])]
    if prefix not in stored:
        raise ConfigError(
            f"adapt@{name}: adapting from layer {prefix + 1} needs the frame-level states of hidden "
            f"state {prefix}, and store {source!r} keeps layers_frames {stored}. Add {prefix} to "
            f"embed.encoders.{source}.layers_frames in params.yaml and rerun `dvc repro embed@{source}`.")
    return stored.index(prefix)


def best_layer(probe_root: str | Path, source: str) -> int | None:
    path = Path(probe_root) / source / "best.json"
    return int(json.loads(path.read_text())["best_layer"]) if path.is_file() else None


def labelled_clips(manifest: str | Path, ids: Sequence[str]) -> tuple[list[str], dict, dict]:
    """The manifest's clips among `ids` (store order), and the labels and folds of the labelled."""
    clips = {c.clip_id: c for c in read_manifest(manifest)}
    ids = [cid for cid in ids if cid in clips]
    labelled = [cid for cid in ids if clips[cid].label and clips[cid].fold >= 0]
    return (ids, {cid: CLASSES.index(clips[cid].label) for cid in labelled},
            {cid: clips[cid].fold for cid in labelled})


# ----------------------------------------------------------------------------- one transform's run
@dataclass
class Transform:
    """What adapt@ and joint@ (and their apply-only entries) share for one run."""

    stage: str  # "adapt" | "joint": clip keys, code version, messages
    name: str
    cfg: AdaptConfig  # training settings (joint: JointConfig.adapt_config())
    build: Callable[[], Adapter]  # a fresh module on the loaded base's blocks
    load: Callable[[str], Any]  # clip id -> the module's input
    device: Any  # torch.device
    write_frames: bool = False  # also store the last adapted layer's frames

    @property
    def tag(self) -> str:
        return f"{self.stage} {self.name}"


def run_transform(t: Transform, base, store_out: Path, trained: Path, ids: list[str], keys: dict,
                  labels: dict, folds: dict, digest: str, describe: dict) -> tuple[dict, bool, int]:
    """Train (or load) the fold models, then bring the store to `ids`, featurising only its todo
    clips. Returns the record, whether training ran, and how many clips were featurised."""
    def train() -> FoldModels:
        return train_folds(base, t.cfg, {c: t.load(c) for c in labels}, labels, folds, t.device, t.build)

    models, record, trained_now = fold_models(t, trained, digest, train, describe, labels)
    wanted = {cid: clip_key(t.stage, keys[cid], digest, record["weights"]) for cid in ids}
    with StoreUpdate(store_out, "embedding", record["store_meta"], wanted) as up:
        print(f"[{t.tag}] {len(ids)} clips ({len(labels)} labelled): {up.reused} cached, "
              f"{len(up.todo)} to write")
        todo = list(up.todo)
        if todo:
            write_features(up, t, models, todo, {c: folds[c] for c in labels})
    return record, trained_now, len(todo)


def fold_models(t: Transform, trained: Path, digest: str, train: Callable[[], FoldModels],
                describe: dict, labels: dict) -> tuple[FoldModels, dict, bool]:
    """The saved fold models when their record names `digest`, else trained now and saved."""
    record = read_record(trained)
    if record is not None and record.get("digest") == digest:
        try:
            models = load_folds(trained, record)
            print(f"[{t.tag}] saved fold weights match the training record ({digest[:12]}): no training")
            return models, record, False
        except MerError as err:
            print(f"[{t.tag}] {err} Training again.")
    why = "no saved weights" if record is None else "the training record changed"
    print(f"[{t.tag}] training {len(describe['folds'])} fold models ({why})")
    models = train()
    return models, save_folds(trained, models, describe, digest, labels), True


def write_features(up: StoreUpdate, t: Transform, models: FoldModels, ids: Sequence[str],
                   fold_of: dict[str, int]) -> None:
    """Featurise `ids` under the fold policy and add them to the store as they come; every
    CHUNK clips are persisted (a killed run resumes from there)."""
    module = models.module or t.build()
    done = enumerate(featurise(module, models, ids, fold_of, t.load, t.cfg, t.device), 1)
    for n, (cid, pooled, last) in done:
        array = last[None].astype(np.float16) if t.write_frames else None
        up.add(cid, array, pooled=pooled.astype(np.float16))
        if n % CHUNK == 0:
            up.checkpoint()


# ----------------------------------------------------------------------------- saved fold models
def trained_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / TRAINED


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def save_folds(folder: Path, models: FoldModels, describe: dict, digest: str, labels: dict) -> dict:
    """Write each fold's tensors (safetensors), then the record last: a record names only
    finished files. Fold files of an earlier training that this one lacks are removed."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD).unlink(missing_ok=True)
    files = {}
    for k, state in zip(models.folds, models.states):
        path, tmp = folder / f"fold-{k}.safetensors", folder / f".tmp-fold-{k}.safetensors"
        save_file({n: v.contiguous() for n, v in state.items()}, str(tmp))
        os.chmod(tmp, 0o644)  # as every other artifact (safetensors writes 0600)
        os.replace(tmp, path)
        files[str(k)] = {"file": path.name, "sha256": _sha256(path)}
    for old in folder.glob("fold-*.safetensors"):
        if old.name not in {f["file"] for f in files.values()}:
            old.unlink()
    weights = weights_digest(models.states)
    meta = {**describe["store_meta"], "weights_digest": weights}
    record = {**describe, "format": RECORD_FORMAT, "digest": digest, "weights": weights,
              "folds": models.folds, "files": files, "store_meta": meta,
              "training": training_summary(models, labels)}
    write_json_atomic(folder / RECORD, record)
    return record


def load_folds(folder: Path, record: dict) -> FoldModels:
    """The recorded fold tensors, each file checked against its recorded sha256."""
    from safetensors.torch import load_file

    states = []
    for k in record["folds"]:
        entry = record["files"][str(k)]
        path = Path(folder) / entry["file"]
        if not path.is_file() or _sha256(path) != entry["sha256"]:
            raise MerError(f"saved weights {path} are missing or differ from their record "
                           f"({Path(folder) / RECORD}).")
        states.append(load_file(str(path)))
    training = record.get("training", {})
    return FoldModels(list(record["folds"]), states, losses=training.get("loss_per_fold", []),
                      parameters=training.get("parameters", {}))


def training_summary(models: FoldModels, labels: dict) -> dict:
    oof = [c for c in labels if c in models.oof_probs]
    scores = compute_metrics(np.array([labels[c] for c in oof]), np.stack([models.oof_probs[c] for c in oof]))
    return {"loss_per_fold": models.losses, "oof_weighted_f1": scores["weighted_f1"],
            "oof_accuracy": scores["accuracy"], "parameters": models.parameters,
            "labelled": len(labels), "folds": models.folds}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()  # fold files are small


# ----------------------------------------------------------------------------- apply only
def saved_record(folder: str | Path, stage: str, name: str, cfg: Any) -> dict:
    """The record of saved fold models that `cfg` and this code may apply (else a MerError)."""
    folder = Path(folder)
    record = read_record(folder)
    fix = f"run `dvc repro {stage}@{name}` (it trains and saves them)"
    if record is None or record.get("format") != RECORD_FORMAT:
        raise MerError(f"{stage}@{name}: no saved fold weights in {folder}; {fix}.")
    if (record.get("stage"), record.get("name")) != (stage, name):
        raise MerError(f"{stage}@{name}: {folder} holds {record.get('stage')}@{record.get('name')}'s weights.")
    now = plain_json(dataclasses.asdict(cfg))
    differ = sorted(k for k in set(now) | set(record["config"])
                    if k != "device" and now.get(k) != record["config"].get(k))
    if differ:
        raise MerError(f"{stage}@{name}: params.yaml's {stage}.{name} {differ} differ from the settings "
                       f"the saved weights in {folder} were trained with; {fix}.")
    code = plain_json(versions.fingerprint(stage))
    if code != record["code"]:
        parts = [k for k in code if code[k] != record["code"].get(k)]
        raise MerError(f"{stage}@{name}: the {stage} code or libraries ({parts}) changed since the saved "
                       f"weights in {folder} were trained; {fix}.")
    return record


def check_store(stage: str, name: str, reader: StoreReader, store: str, record: dict,
                ids: Sequence[str]) -> None:
    """A base store the saved weights may read: the recorded fingerprint, and every clip of `ids`."""
    recorded = record["stores"][store]
    now = dict(reader.meta.get("fingerprint") or {})
    differ = sorted(k for k in set(now) | set(recorded) if k not in TOLERATED and now.get(k) != recorded.get(k))
    if differ:
        raise MerError(
            f"{stage}@{name}: store {reader.path} was made with other {differ} than the {store!r} "
            f"store the saved weights were trained on ({[now.get(k) for k in differ]} vs "
            f"{[recorded.get(k) for k in differ]}). Embed the clips with embed.encoders.{store} as it "
            f"was for training, or retrain on the current store: `dvc repro {stage}@{name}`.")
    missing = [cid for cid in ids if cid not in reader]
    if missing:
        raise MerError(f"{stage}@{name}: {len(missing)} clip(s) are not in store {reader.path}, e.g. "
                       f"{missing[:3]}; embed them with {store!r} first.")


def write_saved(t: Transform, record: dict, trained: Path, ids: Sequence[str], keys: Mapping[str, str],
                out_dir: str | Path) -> Path:
    """Featurise `ids` with the saved fold models (all unlabelled: the fold mean) into `out_dir`."""
    models = load_folds(Path(trained), record)
    ids = list(dict.fromkeys(ids))
    wanted = {cid: clip_key(t.stage, keys[cid], record["digest"], record["weights"]) for cid in ids}
    with StoreUpdate(out_dir, "embedding", record["store_meta"], wanted) as up:
        if up.todo:
            write_features(up, t, models, list(up.todo), {})
    return Path(out_dir)


def apply_saved(name: str, cfg: AdaptConfig, trained_dir: str | Path, features_dir: str | Path,
                ids: Sequence[str], out_dir: str | Path, enc_cfg: EncoderConfig | None = None) -> Path:
    """Adapted features of new clips from the saved fold adapters (see the module docstring)."""
    record = saved_record(trained_dir, "adapt", name, cfg)
    enc_cfg = enc_cfg or EncoderConfig(**record["encoder_config"])
    device = pick_device(cfg.device)
    first, last = record["layers"]
    with StoreReader(Path(features_dir) / cfg.encoder, kind="embedding") as reader:
        check_store("adapt", name, reader, cfg.encoder, record, ids)
        encoder = load_encoder(base_config(enc_cfg, cfg.dtype, device))
        check_base(name, cfg.encoder, reader.meta, encoder)
        t = adapt_transform(name, cfg, layer_stack(base_model(encoder)), reader, first, last, device)
        return write_saved(t, record, Path(trained_dir), ids, reader.keys, out_dir)


def plain_json(value: Any) -> Any:
    """As JSON gives it back (tuples -> lists): records compare with values read from disk."""
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------- the adapt@ stage
def adapt_transform(name: str, cfg: AdaptConfig, stack: LayerStack, reader: StoreReader, first: int,
                    last: int, device) -> Transform:
    """Adapters on `stack`'s blocks first..last, reading the prefix frames of `reader`'s clips."""
    k = prefix_index(name, cfg.encoder, reader.meta, first - 1, stack.num_hidden)
    return Transform("adapt", name, cfg, lambda: Adapter(stack, first, last, cfg, len(CLASSES)),
                     lambda cid: reader.frame_layer(cid, k), device, cfg.write_frames)


def adapt_store(name: str, cfg: AdaptConfig, enc_cfg: EncoderConfig, manifest: str | Path,
                features: str | Path, probe_root: str | Path, out_dir: str | Path,
                store_out: str | Path | None = None) -> dict:
    """Train the fold adapters (or load the saved ones) and bring the store to the manifest's clips."""
    start = time.perf_counter()
    features, out_dir = Path(features), Path(out_dir)
    store_out = Path(store_out or features / name)
    source = cfg.encoder
    device = pick_device(cfg.device)
    encoder = load_encoder(base_config(enc_cfg, cfg.dtype, device))
    with StoreReader(features / source, kind="embedding") as reader:
        base_fp = check_base(name, source, reader.meta, encoder)
        stack = layer_stack(base_model(encoder))
        first, last = resolve_layers(cfg, stack.num_hidden, best_layer(probe_root, source))
        t = adapt_transform(name, cfg, stack, reader, first, last, device)
        ids, labels, folds = labelled_clips(manifest, reader.ids)
        keys = {cid: reader.keys[cid] for cid in ids}
        digest = training_digest(cfg, base_fp, keys, labels, folds, first, last)
        meta = StoreRecord(
            producer="transform", name=name, family="adapt", layers_pooled=tuple(range(first, last + 1)),
            layers_frames=(-1,) if cfg.write_frames else (), hidden_size=int(reader.pooled_shape[2]),
            store_dtype="float16", fingerprint={"base": base_fp, "adapt": digest},
            code_version=versions.code_version("adapt"),  # inside `digest` with its libraries
            extra={"source": source, "adapted_layers": list(range(first, last + 1)),
                   "prefix_layer": first - 1, "config": dataclasses.asdict(cfg)}).to_meta()
        describe = {"stage": "adapt", "name": name, "config": plain_json(dataclasses.asdict(cfg)),
                    "encoder_config": plain_json(dataclasses.asdict(enc_cfg)), "layers": [first, last],
                    "base": base_fp, "stores": {source: reader.meta.get("fingerprint") or {}},
                    "code": plain_json(versions.fingerprint("adapt")), "store_meta": meta,
                    "folds": sorted(set(folds.values()))}
        print(f"[adapt {name}] layers {first}..{last} from cached layer {first - 1}")
        record, trained_now, written = run_transform(t, base_model(encoder), store_out, trained_dir(out_dir),
                                                     ids, keys, labels, folds, digest, describe)
    if not (trained_now or written):
        return read_report(out_dir)
    summary = record["training"]
    report = {"name": name, "encoder": source, "adapted_layers": [first, last], "prefix_layer": first - 1,
              **summary["parameters"], "clips": len(ids), "labelled": len(labels),
              "folds": summary["folds"], "epochs": cfg.epochs, "rank": cfg.rank,
              "loss_per_fold": [[round(v, 5) for v in f] for f in summary["loss_per_fold"]],
              "adapter_oof_weighted_f1": summary["oof_weighted_f1"],
              "adapter_oof_accuracy": summary["oof_accuracy"],
              "unlabelled_features": "mean over the fold adapters", **trained_note(trained_now, written),
              "seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(out_dir / "report.json", report)
    print(f"[adapt {name}] trainable {report['trainable']:,} of {report['total']:,} parameters "
          f"({100 * report['trainable_share']:.3f} %); adapters' own OOF weighted F1 "
          f"{report['adapter_oof_weighted_f1']:.4f}; {report['seconds']} s")
    return report


def trained_note(trained_now: bool, written: int) -> dict:
    """Report keys: where this run's fold models came from, and how many clips it featurised."""
    return {"fold_models": f"trained now, saved in {TRAINED}/" if trained_now else f"loaded from {TRAINED}/",
            "featurised": written}


def read_report(out_dir: Path) -> dict:
    path = out_dir / "report.json"
    if path.is_file():
        return json.loads(path.read_text())
    return write_json_atomic(path, {"cached": True}) and {"cached": True}
