import time, torch, numpy as np
torch.set_num_threads(1)
n = 32*3072
def bench(f, k=300):
    for _ in range(10): f()
    t=time.perf_counter()
    for _ in range(k): f()
    return (time.perf_counter()-t)/k*1e6
x = torch.randn(32, 3072)
print("F.dropout", bench(lambda: torch.nn.functional.dropout(x, 0.3, True)))
print("bernoulli_", bench(lambda: torch.empty(32,3072).bernoulli_(0.7)))
print("rand", bench(lambda: torch.rand(32,3072)))
w = torch.empty(n // 8, dtype=torch.int64)
print("random_ full64", bench(lambda: w.random_(-2**63, None)))
print("random_ full64 + int16 cmp", bench(lambda: w.random_(-2**63, None).view(torch.int16) >= -13107))
print("random_ 0..2^32", bench(lambda: torch.empty(n//4, dtype=torch.int64).random_(0, 2**32)))
g = np.random.default_rng(0)
print("np bytes", bench(lambda: torch.frombuffer(bytearray(g.bytes(n*2)), dtype=torch.int16) >= -13107))
print("np random f32", bench(lambda: torch.from_numpy(g.random(n, dtype=np.float32)) >= 0.3))
v = w.random_(-2**63, None).view(torch.int16).float()
print("int16 mean/std", v.mean().item(), v.std().item(), "expect 0,", 65536/12**0.5)
