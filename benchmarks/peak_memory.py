"""`PeakMemory`: the peak memory growth of a block of code, shared by the benchmark scripts.

On CPU: the growth of the process RSS above its value on entry, sampled by a thread every `interval`
seconds, after handing freed memory back to the OS (`malloc_trim`). On CUDA: torch.cuda.max_memory_allocated
above the value on entry. `mib` holds the result after the block.
"""

from __future__ import annotations

import ctypes
import threading
import time

import psutil
import torch


class PeakMemory:
    def __init__(self, device="cpu", interval: float = 0.002):
        self.device, self.interval, self.mib = torch.device(device), interval, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.process, self.running = psutil.Process(), True
        self.start = self.max_rss = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.max_rss = max(self.max_rss, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
            return
        self.running = False
        self.thread.join()
        self.max_rss = max(self.max_rss, self.process.memory_info().rss)
        self.mib = (self.max_rss - self.start) / 2**20
