"""model.release_freed_memory against a naive reference: the RSS a process had before a burst of
large, short-lived tensors from several threads (decode caches and activations do this). Without
it glibc keeps most of that memory resident after every tensor is freed.

    python -m pytest -q tests/test_memory.py
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BURST = textwrap.dedent("""
    import sys, threading, torch
    sys.path.insert(0, {root!r})
    import model
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for it in range(4):
            keep = []
            for k in range(40):  # 1-32 MB blocks, some freed early: the heap fragments
                t = torch.empty(int(torch.randint(1 << 18, 8 << 20, (1,), generator=g))); t.fill_(1.0)
                keep.append(t)
                if k % 3 == 0:
                    keep.pop(0)
            del keep
    torch.empty(1)
    before = rss()
    for rep in range(2):
        ts = [threading.Thread(target=work, args=(rep * 10 + i,)) for i in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
    kept = rss()
    ran = model.release_freed_memory()
    print(before, kept, rss(), ran)
""")


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or sys.platform != "linux", reason="needs Linux /proc")
def test_freed_tensors_go_back_to_the_os():
    p = subprocess.run([sys.executable, "-c", BURST.format(root=str(ROOT))], capture_output=True, text=True,
                       timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    before, kept, after, ran = p.stdout.split()
    before, kept, after = int(before), int(kept), int(after)
    assert ran == "True"
    assert kept - before > 300e6, "the burst no longer leaves memory behind: the test shows nothing"
    # most of it comes back (here ~70 %); the rest stays in the finished threads' arenas
    assert kept - after > 0.5 * (kept - before), f"only {(kept - after) / 1e6:.0f} of {(kept - before) / 1e6:.0f} MB came back"
