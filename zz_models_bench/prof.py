"""Temporary benchmark (helper for models/); deleted after measuring."""
import sys, time, os, numpy as np, torch
sys.path.insert(0, os.getcwd())
from models.heads import build_head
from models.config import HeadConfig, TrainConfig
from models.train import cross_validate
from models.metrics import compute_metrics
torch.set_num_threads(int(os.environ.get("T", "2")))
print("torch", torch.__version__, "threads", torch.get_num_threads(), flush=True)
dims = {"a": 1024, "b": 1024, "c": 1024}
xs = {k: torch.randn(4000, 1024) for k in "abc"}
y = torch.randint(0, 6, (4000,))
lf = torch.nn.CrossEntropyLoss(weight=torch.ones(6))

def steptime(dropout=0.3, fused=False, det=False, fill=True, n=200):
    torch.use_deterministic_algorithms(det, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    m = build_head(HeadConfig(type="attention", features=list(dims), dropout=dropout), dims)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-5, fused=fused)
    perm = torch.randperm(4000)
    def step(i):
        idx = perm[(i % 120) * 32:(i % 120 + 1) * 32]
        loss = lf(m({k: v[idx] for k, v in xs.items()}), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    for i in range(10): step(i)
    t = time.perf_counter()
    for i in range(n): step(i)
    ms = (time.perf_counter() - t) / n * 1e3
    print(f"dropout={dropout} fused={fused} det={det} fill={fill}: {ms:.3f} ms/step -> 5x60x125 steps = {ms*37.5:.1f} s", flush=True)

for kw in [dict(), dict(fused=True), dict(fused=True, det=True), dict(fused=True, det=True, fill=False),
           dict(fused=True, dropout=0.0)]:
    steptime(**kw)
torch.use_deterministic_algorithms(False)
a = torch.randn(32, 3072)
for f, name in [(lambda: torch.nn.functional.dropout(a, 0.3, True), "dropout 32x3072"),
                (lambda: torch.rand(32, 3072), "rand 32x3072"),
                (lambda: torch.randint(-2**63, 2**63 - 1, (32 * 3072 // 8,), dtype=torch.int64), "randint64 bytes")]:
    for _ in range(10): f()
    t = time.perf_counter()
    for _ in range(500): f()
    print(name, f"{(time.perf_counter() - t) / 500 * 1e6:.1f} us", flush=True)
rng = np.random.default_rng(0)
t = time.perf_counter()
for _ in range(500): rng.random((32, 3072), dtype=np.float32)
print("numpy rand 32x3072", f"{(time.perf_counter() - t) / 500 * 1e6:.1f} us", flush=True)

if os.environ.get("CV", "1") == "1":
    n = 5000
    r = np.random.default_rng(0)
    lab = r.integers(0, 6, n)
    centers = r.normal(size=(6, 1024))
    feats = {"a": (centers[lab] * 0.1 + r.normal(size=(n, 1024))).astype(np.float32),
             "b": r.normal(size=(n, 1024)).astype(np.float32), "c": r.normal(size=(n, 1024)).astype(np.float32)}
    for typ in ["attention", "probe"]:
        t = time.perf_counter()
        res = cross_validate(feats, lab, HeadConfig(type=typ, features=list(dims)), TrainConfig(threads=torch.get_num_threads()))
        print(f"cross_validate {typ} N=5000 D=3x1024 5 folds 60 epochs: {time.perf_counter() - t:.1f} s, wf1 {compute_metrics(lab, res.oof_probs)['weighted_f1']}", flush=True)
