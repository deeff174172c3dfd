import sys, time, os, numpy as np, torch
sys.path.insert(0, os.getcwd())
from models.config import HeadConfig, TrainConfig
from models import train as T
torch.set_num_threads(1)
n = 5000
r = np.random.default_rng(0)
lab = r.integers(0, 6, n)
centers = r.normal(size=(6, 1024))
feats = {"a": (centers[lab] * 0.1 + r.normal(size=(n, 1024))).astype(np.float32),
         "b": r.normal(size=(n, 1024)).astype(np.float32), "c": r.normal(size=(n, 1024)).astype(np.float32)}
tiny = torch.finfo(torch.float32).tiny
def den(t): return int(((t != 0) & (t.abs() < tiny)).sum())
captured = {}
orig_fit = T._fit
def fit(model, *a, **k):
    captured["model"] = model
    def hook(mod, gin, gout):
        for g in gout:
            if g is not None and den(g): captured.setdefault("gout:" + type(mod).__name__, []).append(den(g) / g.numel())
    def fhook(mod, inp, out):
        if den(out): captured.setdefault("act:" + type(mod).__name__, []).append(den(out) / out.numel())
    for m in model.modules():
        m.register_full_backward_hook(hook); m.register_forward_hook(fhook)
    return orig_fit(model, *a, **k)
T._fit = fit
orig_step = torch.optim.Adam.step
def step(self, *a, **k):
    out = orig_step(self, *a, **k)
    for p in self.param_groups[0]["params"]:
        st = self.state[p]
        for name, t in [("param", p), ("grad", p.grad), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"])]:
            d = den(t)
            if d: captured.setdefault("opt:" + name, []).append(d / t.numel())
    return out
torch.optim.Adam.step = step
T.cross_validate(feats, lab, HeadConfig(type="attention", features=list("abc"), epochs=3), TrainConfig(threads=1))
for k, v in captured.items():
    if k != "model": print(k, len(v), "mean frac", np.mean(v), "max", np.max(v))
