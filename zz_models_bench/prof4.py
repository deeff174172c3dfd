import sys, time, os, numpy as np, torch
sys.path.insert(0, os.getcwd())
from models.config import HeadConfig, TrainConfig
from models import train as T
torch.set_num_threads(int(sys.argv[1]))
n = 5000
r = np.random.default_rng(0)
lab = r.integers(0, 6, n)
feats = {k: r.normal(size=(n, 1024)).astype(np.float32) for k in "abc"}
cfg = HeadConfig(type="attention", features=list("abc"), epochs=2)
orig = T._fit
def prof_fit(*a, **k):
    with torch.profiler.profile() as p:
        t = time.perf_counter()
        out = orig(*a, **k)
        print("fit s", time.perf_counter() - t)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return out
T._fit = prof_fit
T.cross_validate(feats, lab, cfg, TrainConfig(threads=int(sys.argv[1])))
