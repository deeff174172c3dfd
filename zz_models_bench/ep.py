import sys, time, os, numpy as np, torch
sys.path.insert(0, os.getcwd())
from models.config import HeadConfig, TrainConfig
from models.train import cross_validate
threads, epochs, flush = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
torch.set_flush_denormal(flush)
n = 5000
r = np.random.default_rng(0)
lab = r.integers(0, 6, n)
centers = r.normal(size=(6, 1024))
feats = {"a": (centers[lab] * 0.1 + r.normal(size=(n, 1024))).astype(np.float32),
         "b": r.normal(size=(n, 1024)).astype(np.float32), "c": r.normal(size=(n, 1024)).astype(np.float32)}
t = [time.perf_counter()]
def cb(f, e, loss):
    if f == 0:
        t.append(time.perf_counter()); print(f"epoch {e}: {t[-1]-t[-2]:.2f}s loss {loss:.4f}", flush=True)
cross_validate(feats, lab, HeadConfig(type=sys.argv[4] if len(sys.argv) > 4 else "attention", features=list("abc"), epochs=epochs), TrainConfig(threads=threads), on_epoch=cb)
