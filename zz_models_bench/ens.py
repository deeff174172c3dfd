import time, torch, sys, os, math
sys.path.insert(0, os.getcwd())
torch.set_num_threads(int(sys.argv[1]))
torch.use_deterministic_algorithms(True, warn_only=True)
torch.utils.deterministic.fill_uninitialized_memory = False
from torch import nn

def drop(x, p, training=True):
    if not training or p == 0: return x
    n = x.numel()
    w = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)
    keep = w.view(torch.int16)[:n].view(x.shape) >= (round(p * 65536) - 32768)
    return x * keep.to(x.dtype).mul_(65536 / (65536 - round(p * 65536)))

class Lin(nn.Module):
    def __init__(s, E, i, o):
        super().__init__()
        s.w = nn.Parameter(torch.randn(E, i, o) / i**0.5); s.b = nn.Parameter(torch.zeros(E, 1, o))
    def forward(s, x): return torch.baddbmm(s.b, x, s.w)
class Enc(nn.Module):
    def __init__(s, E, i, h, p):
        super().__init__(); s.p = p; s.l = nn.ModuleList([Lin(E, i, h), Lin(E, h, h), Lin(E, h, h)])
    def forward(s, x):
        x = drop(x, s.p, s.training)
        for l in s.l: x = torch.relu(l(x))
        return x
class Att(nn.Module):
    def __init__(s, E, dims, h=128, p=0.3, C=6):
        super().__init__()
        s.enc = nn.ModuleList([Enc(E, d, h, p) for d in dims]); s.am = Enc(E, h*len(dims), h, p)
        s.fa = Lin(E, h, len(dims)); s.fo = Lin(E, h, C)
    def forward(s, xs):
        hs = [e(x) for e, x in zip(s.enc, xs)]
        w = torch.softmax(s.fa(s.am(torch.cat(hs, -1))), -1)
        fused = (torch.stack(hs, -1) @ w.unsqueeze(-1)).squeeze(-1)
        return s.fo(fused)

def run(E, steps=100, p=0.3):
    m = Att(E, [1024]*3, p=p)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-5, fused=True)
    xs = [torch.randn(E, 4000, 1024) for _ in range(3)]
    y = torch.randint(0, 6, (E, 4000))
    perm = torch.stack([torch.randperm(4000) for _ in range(E)])
    W = torch.ones(E, 6)
    def step(i):
        idx = perm[:, (i%120)*32:(i%120+1)*32]  # [E, B]
        batch = [x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])) for x in xs]
        logits = m(batch)
        yb = y.gather(1, idx)
        nll = -torch.log_softmax(logits, -1).gather(-1, yb[..., None]).squeeze(-1)
        w = W.gather(1, yb)
        loss = ((w * nll).sum(1) / w.sum(1)).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    for i in range(5): step(i)
    t = time.perf_counter()
    for i in range(steps): step(i)
    ms = (time.perf_counter() - t) / steps * 1e3
    print(f"E={E} p={p}: {ms:.2f} ms/step, {ms/E:.2f} ms per fold-step -> {ms/E*37.5:.1f} s for 5x60x125", flush=True)

for E in (1, 5, 1, 5):
    run(E)
run(5, p=0.0)
