import sys, time, os, numpy as np, torch
sys.path.insert(0, os.getcwd())
from models.config import HeadConfig, TrainConfig
from models.train import cross_validate
threads, epochs = int(sys.argv[1]), int(sys.argv[2])
n = 5000
r = np.random.default_rng(0)
lab = r.integers(0, 6, n)
centers = r.normal(size=(6, 1024))
feats = {"a": (centers[lab] * 0.1 + r.normal(size=(n, 1024))).astype(np.float32),
         "b": r.normal(size=(n, 1024)).astype(np.float32), "c": r.normal(size=(n, 1024)).astype(np.float32)}
a = torch.randn(5, 1024, 128); b = torch.randn(5, 32, 1024) * 1e-39; c = torch.randn(5, 32, 1024)
def tb(x):
    s = time.perf_counter()
    for _ in range(20): torch.bmm(x, a)
    return (time.perf_counter() - s) / 20 * 1e6
t = [time.perf_counter()]
def cb(f, e, loss):
    if f == 0:
        t.append(time.perf_counter())
        print(f"epoch {e}: {t[-1]-t[-2]:.2f}s loss {loss:.4f} bmm normal {tb(c):.0f}us denormal {tb(b):.0f}us load {os.getloadavg()[0]:.2f}", flush=True)
        t[-1] = time.perf_counter()
cross_validate(feats, lab, HeadConfig(type="attention", features=list("abc"), epochs=epochs), TrainConfig(threads=threads), on_epoch=cb)
