"""Virtual clients' tasks on a Ray cluster (`backend = "ray"`, the `ray` extra): each worker is
a Ray actor holding one `ClientRunner`, with `worker_threads` CPUs and, on CUDA,
1 / `workers_per_gpu` of a GPU reserved for it, so Ray never places more of them on a node or
GPU than it has.

Workers may run on other machines: the global model goes to them through Ray's object store
(put once per model, not once per client) and updates come back as safetensors bytes. Ray
moves these between the processes of the cluster the simulation was pointed at; that cluster
must be the user's own (docs/simulation.md).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from pathlib import Path
from typing import Any

import torch

from fedlink.common.errors import ConfigError
from fedlink.simulation.clients import ClientResult, ClientRunner, ClientSettings, ClientWork
from fedlink.simulation.driver import Done

log = logging.getLogger(__name__)


class _RemoteRunner:
    """The actor: one model for every virtual client it is given."""

    def __init__(self, settings: ClientSettings, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self._runner = ClientRunner(settings)
        self._runner.warm_up()
        self._runner.place(torch.device(device))

    def ready(self) -> None:
        return None

    def run(self, work: ClientWork, model: bytes) -> ClientResult:
        return self._runner.run(dataclasses.replace(work, model=model))


class RayWorkers:
    """Ray actors fed from one queue: whichever is idle takes the next task."""

    def __init__(
        self,
        settings: ClientSettings,
        address: str | None,
        workers: int,
        device: str,
        workers_per_gpu: int,
        threads: int,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                'backend "ray" needs Ray: pip install "fedlink[ray]" (or pip install ray)'
            ) from None
        self._ray: Any = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # address None starts a local Ray for this program; "auto" or ray://... joins one.
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        resources = self._ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_cuda = device == "cuda" or (device == "auto" and gpus > 0)
        if use_cuda and gpus == 0:
            self.close()
            raise ConfigError("device cuda was requested but the Ray cluster has no GPU")
        count = workers or (
            gpus * workers_per_gpu if use_cuda else max(1, int(resources.get("CPU", 1)) // threads)
        )
        actor = self._ray.remote(_RemoteRunner).options(
            num_cpus=threads, num_gpus=1 / workers_per_gpu if use_cuda else 0
        )
        # Ray gives each actor its own GPU share through CUDA_VISIBLE_DEVICES: "cuda" is it.
        self._actors: list[Any] = [
            actor.remote(settings, "cuda" if use_cuda else "cpu", threads) for _ in range(count)
        ]
        try:
            self._ray.get([a.ready.remote() for a in self._actors])
        except Exception as exc:
            self.close()
            raise ConfigError(f"the Ray workers did not start: {exc}") from None
        self._queue: queue.SimpleQueue[tuple[ClientWork, Done] | None] = queue.SimpleQueue()
        self._model: tuple[Path | bytes, Any] | None = None  # the model last put, and its ref
        self._dispatcher = threading.Thread(target=self._dispatch, name="ray-workers", daemon=True)
        self._dispatcher.start()
        log.info(
            "%d Ray workers (%s, %d CPUs each) on %s",
            count,
            "cuda" if use_cuda else "cpu",
            threads,
            self._ray.get_runtime_context().gcs_address,
        )

    def submit(self, work: ClientWork, done: Done) -> None:
        self._queue.put((work, done))

    def _model_ref(self, model: Path | bytes) -> Any:
        if self._model is None or self._model[0] != model:
            data = model.read_bytes() if isinstance(model, Path) else model
            self._model = (model, self._ray.put(data))
        return self._model[1]

    def _dispatch(self) -> None:
        ray = self._ray
        idle = list(self._actors)
        running: dict[Any, tuple[Any, ClientWork, Done]] = {}
        while True:
            if idle:
                try:
                    item = self._queue.get(timeout=0.01 if running else None)
                except queue.Empty:
                    pass
                else:
                    if item is None:
                        return
                    work, done = item
                    actor = idle.pop()
                    ref = actor.run.remote(work, self._model_ref(work.model))
                    running[ref] = (actor, work, done)
                    continue
            if running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.01)
                for ref in ready:
                    actor, work, done = running.pop(ref)
                    try:
                        result: ClientResult | BaseException = ray.get(ref)
                    except Exception as exc:  # the task's error, as Ray reports it
                        result = RuntimeError(f"{work.identity}: {exc}")
                    done(result)
                    idle.append(actor)

    def close(self) -> None:
        if hasattr(self, "_dispatcher"):
            self._queue.put(None)
            self._dispatcher.join()
        for actor in getattr(self, "_actors", []):
            self._ray.kill(actor)
        if self._owns_ray:
            self._ray.shutdown()
