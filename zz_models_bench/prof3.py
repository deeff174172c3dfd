import time, torch, sys, os
sys.path.insert(0, os.getcwd())
from models.heads import build_head
from models.config import HeadConfig
torch.set_num_threads(int(sys.argv[1]))
torch.use_deterministic_algorithms(True, warn_only=True)
torch.utils.deterministic.fill_uninitialized_memory = False
dims = {"a":1024,"b":1024,"c":1024}
m = build_head(HeadConfig(type="attention", features=list(dims)), dims)
opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-5, fused=True)
xs = {k: torch.randn(4000, 1024) for k in "abc"}
y = torch.randint(0, 6, (4000,))
lf = torch.nn.CrossEntropyLoss(weight=torch.ones(6))
perm = torch.randperm(4000)
def step(i):
    idx = perm[(i%120)*32:(i%120+1)*32]
    loss = lf(m({k: v[idx] for k, v in xs.items()}), y[idx])
    opt.zero_grad(); loss.backward(); opt.step()
for i in range(10): step(i)
with torch.profiler.profile() as p:
    t=time.perf_counter()
    for i in range(100): step(i)
    print("ms/step", (time.perf_counter()-t)*10)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
