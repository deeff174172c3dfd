import time, torch, ctypes, os
torch.set_num_threads(2)
a = torch.randn(5, 1024, 128); b = torch.randn(5, 32, 1024) * 1e-39
c = torch.randn(5, 32, 1024)
torch.bmm(c, a)
def t(x):
    for _ in range(3): torch.bmm(x, a)
    s = time.perf_counter()
    for _ in range(30): torch.bmm(x, a)
    return (time.perf_counter() - s) / 30 * 1e6
print("before: normal", t(c), "denormal", t(b))
path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
gomp = ctypes.CDLL(path)
seen = []
@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def fn(_):
    seen.append(torch.set_flush_denormal(True))
gomp.GOMP_parallel(fn, None, ctypes.c_uint(torch.get_num_threads()), ctypes.c_uint(0))
print("set on", len(seen), "threads")
print("after: normal", t(c), "denormal", t(b))
