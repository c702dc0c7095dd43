"""elastic/allocator.py: the workers' malloc options, and when they are left alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from elastic.allocator import _glibc, user_chose_allocator
from elastic.config import parse_job_spec

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc")


def test_a_chosen_allocator_is_left_alone():
    assert user_chose_allocator({}) is None
    assert user_chose_allocator({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}) == "LD_PRELOAD=/usr/lib/libtcmalloc.so.4"
    assert user_chose_allocator({"MALLOC_ARENA_MAX": "2"}) == "MALLOC_ARENA_MAX is set"
    assert user_chose_allocator({"LD_PRELOAD": "/opt/libfoo.so"}) is None
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == "GLIBC_TUNABLES sets glibc.malloc options"
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"}) is None


def test_the_spec_switch_defaults_on_and_turns_off():
    base = {"name": "j", "task": "examples.digits:DigitsTask", "batch_size_per_worker": 8, "total_progress": 10,
            "optimizer": {"name": "sgd", "lr": 0.1}}
    assert parse_job_spec(base).cluster.retain_heap is True
    assert parse_job_spec({**base, "cluster": {"retain_heap": False}}).cluster.retain_heap is False


_STEPS = textwrap.dedent("""
    import sys
    import torch
    from elastic.allocator import retain_freed_memory
    from examples.jpeg_digits import SmallResNet
    def faults():
        return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
    print("set" if len(sys.argv) < 2 and retain_freed_memory() is None else "not-set")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = SmallResNet(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for _ in range(3):   # warm up: the heap grows to the step's peak
        step()
    before = faults()
    for _ in range(5):
        step()
    print((faults() - before) / 5)
""")


@needs_glibc
def test_a_retained_heap_serves_each_step_without_faulting_its_memory_in_again():
    """A small ResNet step at batch 64 allocates and frees tens of MB of activations and gradients
    (about 10,000 minor page faults per step here without the options, run with an argument to
    see it): with them, the steps after the warm-up reuse the heap (300-400 faults per step here)."""
    out = subprocess.run([sys.executable, "-c", _STEPS], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}).stdout.split()
    assert out[0] == "set"
    assert float(out[1]) < 2_000, f"{out[1]} minor page faults per step"
