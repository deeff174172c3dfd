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
for kw in [dict(dropout=0.3), dict(dropout=0.0), dict(dropout=0.3, batch_size=128)]:
    t = time.perf_counter(); c = time.process_time()
    cross_validate(feats, lab, HeadConfig(type=sys.argv[3] if len(sys.argv) > 3 else "attention", features=list("abc"), epochs=epochs, **kw), TrainConfig(threads=threads))
    print(kw, f"wall {time.perf_counter()-t:.1f}s cpu {time.process_time()-c:.1f}s per epoch cpu {(time.process_time()-c)/epochs:.2f}s load {os.getloadavg()[0]:.1f}", flush=True)
