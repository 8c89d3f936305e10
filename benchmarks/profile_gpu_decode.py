"""Where a decode step's time goes on the GPU: the 7B-shaped Q4_0 model of bench_gpu.py, whole on the
GPU, 32 greedy steps under torch.profiler (its CUPTI trace sees every kernel of the process, ours
included): per-kernel time per token, GPU-busy time against wall time, and the GPU's idle gaps.

    python benchmarks/profile_gpu_decode.py      # needs torch with CUDA and a CUDA build of pyengine
"""
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).parent))
import bench_gpu as B
import pyengine
import torch
from torch.profiler import profile, ProfilerActivity

path = Path("/tmp/pe_prof.gguf")
B.write_model(path, "q4_0")
e = pyengine.Engine(path, n_ctx=256, n_batch=64, n_gpu_layers=99)
e.eval(np.arange(16) % 1000)
tok, n = 1, 32
t = time.perf_counter()
for _ in range(n):
    tok = int(np.argmax(e.eval([tok])))
wall = (time.perf_counter() - t) / n
print(f"decode wall per token {wall*1e3:.2f} ms ({1/wall:.1f} tok/s)")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(e.eval([tok])))
    torch.cuda.synchronize()
    wall_p = (time.perf_counter() - t) / n
print(f"profiled wall {wall_p*1e3:.2f} ms/token")
try:
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=16, max_name_column_width=70))
except Exception as ex:
    print("table failed:", ex)
events = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
kern = [ev for ev in events if "memcpy" not in ev.name.lower() and "memset" not in ev.name.lower()]
copies = [ev for ev in events if ev not in kern]
ktime = sum(ev.device_time for ev in kern) / n / 1e3
ctime = sum(ev.device_time for ev in copies) / n / 1e3
print(f"profiled wall {wall_p*1e3:.2f} ms/token; kernels {len(kern)/n:.0f}/token, {ktime:.2f} ms/token busy; "
      f"copies {len(copies)/n:.0f}/token, {ctime:.3f} ms/token")
by = {}
for ev in kern:
    k = ev.name.split("<")[0][:60] + ("<" + ev.name.split("<")[1][:30] if "<" in ev.name else "")
    c, tt = by.get(k, (0, 0.0)); by[k] = (c + 1, tt + ev.device_time)
for k, (c, tt) in sorted(by.items(), key=lambda x: -x[1][1])[:14]:
    print(f"{tt/n/1e3:8.3f} ms/token {c/n:6.1f}/token {tt/c:8.1f} us  {k}")
starts = sorted((ev.time_range.start, ev.time_range.end) for ev in events)
gaps = [b[0] - a[1] for a, b in zip(starts, starts[1:]) if b[0] > a[1]]
print(f"GPU idle between consecutive GPU ops: {sum(gaps)/n/1e3:.2f} ms/token over {len(gaps)/n:.0f} gaps")
