import sys, time, os, numpy as np, torch
sys.path.insert(0, os.getcwd())
from models.config import HeadConfig, TrainConfig
from models.train import cross_validate
from models.metrics import compute_metrics
threads, epochs, typ = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
n = 5000
r = np.random.default_rng(0)
lab = r.integers(0, 6, n)
centers = r.normal(size=(6, 1024))
feats = {"a": (centers[lab] * 0.1 + r.normal(size=(n, 1024))).astype(np.float32),
         "b": r.normal(size=(n, 1024)).astype(np.float32), "c": r.normal(size=(n, 1024)).astype(np.float32)}
t = time.perf_counter(); c0 = time.process_time()
res = cross_validate(feats, lab, HeadConfig(type=typ, features=list("abc"), epochs=epochs), TrainConfig(threads=threads))
wall = time.perf_counter() - t
print(f"{typ} threads={threads} epochs={epochs}: wall {wall:.1f}s cpu {time.process_time()-c0:.1f}s -> x{60/epochs:.0f} = {wall*60/epochs:.1f}s for 60 epochs; wf1 {compute_metrics(lab, res.oof_probs)['weighted_f1']}", flush=True)
