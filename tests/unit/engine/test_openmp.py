"""Releasing a thread's OpenMP workers, and the engine doing it when it goes idle."""

from __future__ import annotations

import os
import threading
import time

import torch

from ccoe_common.engine import engine as engine_module
from ccoe_common.engine.engine import Engine, EngineConfig
from ccoe_common.engine.openmp import release_openmp_workers
from ccoe_common.engine.params import GenerationRequest, SamplingParams
from ccoe_common.model import CCoEModel


def _os_threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_release_frees_the_calling_threads_workers():
    seen: dict[str, int | bool] = {}

    def work() -> None:
        torch.set_num_threads(2)  # a pool of 2 = this thread + 1 worker, even on one core
        before = _os_threads()
        torch.randn(4_000_000).exp_()  # big enough for a parallel region
        seen["with_pool"] = _os_threads() - before
        seen["released"] = release_openmp_workers()
        time.sleep(0.2)  # the worker exits asynchronously once told to
        seen["after_release"] = _os_threads() - before
        torch.randn(4_000_000).exp_()
        seen["recreated"] = _os_threads() - before

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["released"] is True
    assert seen["with_pool"] >= 1, "the parallel kernel should have started a worker thread"
    assert seen["after_release"] < seen["with_pool"], "the worker should have exited"
    assert seen["recreated"] >= seen["after_release"] + 1, "the next kernel must get its worker back"


def test_engine_releases_its_workers_when_it_goes_idle(deep_qwen2_dir, monkeypatch):
    calls: list[str] = []
    real = engine_module.release_openmp_workers

    def spy() -> bool:
        calls.append(threading.current_thread().name)
        return real()

    monkeypatch.setattr(engine_module, "release_openmp_workers", spy)
    model = CCoEModel.from_pretrained(deep_qwen2_dir)
    with Engine(model, EngineConfig(max_seq_len=64, max_running=2, max_batched_tokens=8, prefill_chunk=4)) as eng:
        assert calls == [threading.current_thread().name], "start() releases the starting thread's workers"
        sampling = SamplingParams.create(max_new_tokens=3, ignore_eos=True)
        for n in (1, 2):
            eng.complete_sync(GenerationRequest(prompt_ids=[5, 6, 7], sampling=sampling), timeout=60)
            deadline = time.monotonic() + 5
            while calls.count("ccoe-engine") < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert calls.count("ccoe-engine") == n, f"no release after busy period {n}: {calls}"
        time.sleep(0.3)  # several idle ticks of the loop
        # Once per busy period, never on every idle tick.
        assert calls.count("ccoe-engine") == 2, calls
