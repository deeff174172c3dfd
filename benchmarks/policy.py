"""What a head sees on clips outside the labelled set: fold-mean features vs each fold on its own.

    python benchmarks/policy.py [--seeds 3] [--labelled 3000] [--test 3000]

The pipeline's trained feature transforms (`adapt@`, `joint@`) are K fold models. A labelled clip
of fold k gets the features of fold k's model (the one that did not train on it), and fold k's
head trains on the labelled clips outside fold k, so on the features of the *other* K-1 fold
models. Planted here (synthetic, seeded, seconds on a CPU):

* 6 classes in MER2024's labelled proportions; a 16-d latent (class mean + noise); base features
  (48-d) = tanh of a fixed random projection + noise: the frozen encoder's output.
* K = 5 fold transforms, each *learnt* on the labelled clips outside its fold (a 64-d GELU layer
  + a linear classifier, cross entropy, Adam), in two regimes:
  - `lora`: a shared frozen base layer plus a rank-4 update (B initialised at zero, A random per
    fold), as the LoRA adapters: the fold transforms are close;
  - `independent`: each fold's layer initialised at random (seed per fold), as a projector
    trained from scratch (`joint@`): the fold transforms share no coordinates.
* K heads: class-balanced multinomial logistic regressions (torch L-BFGS), head k on the
  labelled clips outside fold k with their out-of-fold features (the pipeline's rule).

Held-out test clips (same class balance) are predicted three ways:
  A  mean of the K transforms' features, then the mean of the K heads' probabilities on that one
     vector (the pipeline today);
  B  fold k's head on fold k's features, probabilities averaged over k (what the labelled clips'
     out-of-fold rows are: head k on transform k, so BCTS fitted on them sees the same kind);
  C  fold k's head on each of the K-1 transforms it trained on, averaged over those and over k.
Measured: accuracy, weighted F1, NLL and ECE (15 bins on the top probability) per option and
regime, averaged over seeds; the out-of-fold scores of the labelled clips for reference. The last
output line is the JSON summary; the full record goes to benchmarks/results/policy-<date>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, timer  # noqa: E402
from semi import fit_logreg  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from features.media.manifest import stratified_folds  # noqa: E402
from models.evaluation.metrics import fast_scores  # noqa: E402

C, K, LATENT, D, H, RANK = 6, 5, 16, 48, 64, 4
SHARES = np.array([1248, 1208, 1038, 730, 616, 190]) / 5030  # MER2024's labelled classes
OPTIONS = ("A_mean_features", "B_fold_on_own", "C_fold_on_trained")


class World:
    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.means = rng.normal(scale=0.6, size=(C, LATENT))
        self.proj = rng.normal(size=(LATENT, D)) / np.sqrt(LATENT)
        self.base = rng.normal(size=(D, H)) / np.sqrt(D)  # the "pretrained" layer (lora regime)

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = self.rng.choice(C, size=n, p=SHARES)
        z = self.means[y] + self.rng.normal(size=(n, LATENT)) * 1.2
        x = np.tanh(z @ self.proj) + 0.3 * self.rng.normal(size=(n, D))
        return x.astype(np.float32), y


def train_transform(x: np.ndarray, y: np.ndarray, regime: str, base: np.ndarray, seed: int,
                    steps: int = 200):
    """A fold model: GELU layer (+ classifier) trained by cross entropy; returns x -> features."""
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if regime == "lora":
        w0 = torch.from_numpy(base.astype(np.float32))
        a = (torch.randn(D, RANK, generator=g) / np.sqrt(D)).requires_grad_()
        b = torch.zeros(RANK, H, requires_grad=True)
        params, weight = [a, b], lambda: w0 + a @ b
    else:
        w = (torch.randn(D, H, generator=g) / np.sqrt(D)).requires_grad_()
        params, weight = [w], lambda: w
    head = torch.nn.Linear(H, C)
    torch.nn.init.normal_(head.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(params + list(head.parameters()), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(torch.nn.functional.gelu(xt @ weight())), yt)
        loss.backward()
        opt.step()
    w_final = weight().detach()

    def transform(v: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.nn.functional.gelu(torch.from_numpy(v) @ w_final).numpy()
    return transform


def train_head(x: np.ndarray, y: np.ndarray):
    """A fold head: benchmarks/semi.py's class-balanced logistic regression; x -> probs."""
    return fit_logreg(x, y, l2=1e-3, iters=80)


def scores(y: np.ndarray, p: np.ndarray, bins: int = 15) -> dict:
    wf1, acc = fast_scores(y, p.argmax(1))
    nll = float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())
    conf, hit = p.max(1), (p.argmax(1) == y)
    edges = np.minimum((conf * bins).astype(int), bins - 1)
    ece = sum(abs(hit[edges == i].mean() - conf[edges == i].mean()) * (edges == i).mean()
              for i in range(bins) if (edges == i).any())
    return {"accuracy": acc, "weighted_f1": wf1, "nll": round(nll, 4), "ece": round(float(ece), 4)}


def run(regime: str, seed: int, n_lab: int, n_test: int) -> dict:
    world = World(seed)
    x, y = world.draw(n_lab)
    xt, yt = world.draw(n_test)
    folds = stratified_folds(y, K, seed)
    transforms = [train_transform(x[folds != k], y[folds != k], regime, world.base, 100 * seed + k)
                  for k in range(K)]
    feats = np.zeros((n_lab, H), np.float32)
    for k in range(K):  # labelled clips: the fold model that did not train on them
        feats[folds == k] = transforms[k](x[folds == k])
    heads = [train_head(feats[folds != k], y[folds != k]) for k in range(K)]
    oof = np.zeros((n_lab, C))
    for k in range(K):
        oof[folds == k] = heads[k](feats[folds == k])
    test_feats = [t(xt) for t in transforms]
    mean_feats = np.mean(test_feats, axis=0)
    probs = {
        "A_mean_features": np.mean([h(mean_feats) for h in heads], axis=0),
        "B_fold_on_own": np.mean([heads[k](test_feats[k]) for k in range(K)], axis=0),
        "C_fold_on_trained": np.mean([heads[k](test_feats[m]) for k in range(K)
                                      for m in range(K) if m != k], axis=0),
    }
    # how far apart the fold transforms are: mean cosine of one clip's features across folds
    f = np.stack(test_feats)
    f = f / (np.linalg.norm(f, axis=2, keepdims=True) + 1e-9)
    cos = np.mean([(f[i] * f[j]).sum(1).mean() for i in range(K) for j in range(K) if i < j])
    return {"oof": scores(y, oof), "fold_feature_cosine": round(float(cos), 4),
            **{o: scores(yt, p) for o, p in probs.items()}}


def mean_of(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        if isinstance(runs[0][key], dict):
            out[key] = {m: round(float(np.mean([r[key][m] for r in runs])), 4) for m in runs[0][key]}
        else:
            out[key] = round(float(np.mean([r[key] for r in runs])), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--labelled", type=int, default=3000)
    p.add_argument("--test", type=int, default=3000)
    args = p.parse_args()
    torch.set_num_threads(1)
    results: dict = {"settings": vars(args) | {"K": K, "D": D, "H": H, "rank": RANK}}
    summary: dict = {}
    with timer() as t:
        for regime in ("lora", "independent"):
            runs = [run(regime, s, args.labelled, args.test) for s in range(args.seeds)]
            results[regime] = {"mean": mean_of(runs), "per_seed": runs}
            m = results[regime]["mean"]
            print(f"{regime}: cosine {m['fold_feature_cosine']} oof {m['oof']}", file=sys.stderr)
            for o in OPTIONS:
                print(f"  {o}: {m[o]}", file=sys.stderr)
                summary[f"{regime}_{o[0]}"] = {k: m[o][k] for k in ("weighted_f1", "nll", "ece")}
    summary["total_s"] = round(t["s"], 1)
    results["total_s"] = summary["total_s"]
    save("policy", results, summary)


if __name__ == "__main__":
    main()
