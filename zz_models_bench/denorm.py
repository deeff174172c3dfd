import time, torch, sys
torch.set_num_threads(2)
a = torch.randn(5, 1024, 128); b = torch.randn(5, 32, 1024) * 1e-39  # denormal inputs
c = torch.randn(5, 32, 1024)
torch.bmm(c, a)  # create the thread pool before setting flush
def t(x):
    for _ in range(3): torch.bmm(x, a)
    s = time.perf_counter()
    for _ in range(50): torch.bmm(x, a)
    return (time.perf_counter() - s) / 50 * 1e6
print("normal", t(c), "denormal", t(b))
print("flush", torch.set_flush_denormal(True))
print("normal", t(c), "denormal", t(b))
