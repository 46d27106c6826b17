"""Where virtual clients' tasks run: a pool of worker processes, each with one `ClientRunner`
(one model) pinned to one device.

Workers are forked before the simulation starts any thread, so they start in milliseconds with
torch and the task already imported. Tasks and results travel over each worker's pipe between
processes of this one program; the global model goes by file path (the file the round engine
wrote) and comes back as safetensors bytes, never as pickled tensors.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from fedlink.common.errors import ConfigError, FedlinkError
from fedlink.common.threads import usable_cpus
from fedlink.simulation.clients import ClientRunner, ClientSettings, ClientWork
from fedlink.simulation.driver import Done

log = logging.getLogger(__name__)

# How long a forked worker may take to build its model.
READY_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers, on which devices: worker i trains on `devices[i]`."""

    devices: tuple[str, ...]
    threads: int


def plan_workers(
    workers: int, device: str, workers_per_gpu: int, threads: int, gpus: int, cpus: int
) -> WorkerPlan:
    """Workers and their devices. On CUDA, worker i is pinned to cuda:(i mod gpus), so each GPU
    holds at most ceil(workers / gpus) models and clients in training at once; 0 workers means
    `workers_per_gpu` per GPU there, and on CPU one per usable CPU (each `threads` threads)."""
    use_cuda = device == "cuda" or (device == "auto" and gpus > 0)
    if use_cuda and gpus == 0:
        raise ConfigError("device cuda was requested but no CUDA device is available")
    if use_cuda:
        count = workers or gpus * workers_per_gpu
        return WorkerPlan(tuple(f"cuda:{i % gpus}" for i in range(count)), threads)
    count = workers or max(1, cpus // threads)
    return WorkerPlan(("cpu",) * count, threads)


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_plan(workers: int, device: str, workers_per_gpu: int, threads: int) -> WorkerPlan:
    """`plan_workers` on this machine's GPUs and usable CPUs."""
    return plan_workers(workers, device, workers_per_gpu, threads, _gpus(), usable_cpus())


def _serve(runner: ClientRunner, device: str, threads: int, conn: Connection) -> None:
    """A worker process: say it is ready (or why it cannot be), then run tasks from `conn`
    until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the simulation stops its workers itself
    torch.set_num_threads(threads)
    try:
        runner.place(torch.device(device))
    except Exception as exc:
        conn.send(RuntimeError(f"a worker could not use {device}: {exc}"))
        return
    conn.send(None)
    while True:
        try:
            work = conn.recv()
        except EOFError:
            return
        if work is None:  # the simulation is over
            return
        try:
            conn.send(runner.run(work))
        except Exception as exc:  # the task's own error, reported to the simulation
            conn.send(RuntimeError(f"{work.identity}: {type(exc).__name__}: {exc}"))


class ProcessWorkers:
    """Worker processes fed from one queue: whichever is free takes the next task."""

    def __init__(self, settings: ClientSettings, plan: WorkerPlan) -> None:
        runner = ClientRunner(settings)  # a task that cannot load fails here, once
        runner.warm_up()
        context = multiprocessing.get_context("fork")
        self._queue: queue.SimpleQueue[tuple[ClientWork, Done] | None] = queue.SimpleQueue()
        self._processes: list[Any] = []
        self._feeders: list[threading.Thread] = []
        connections: list[Connection] = []
        for device in plan.devices:
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_serve, args=(runner, device, plan.threads, theirs), daemon=True
            )
            process.start()
            theirs.close()
            self._processes.append(process)
            connections.append(ours)
        for conn in connections:
            try:
                ready = conn.recv() if conn.poll(READY_TIMEOUT_SECONDS) else TimeoutError()
            except EOFError:
                ready = RuntimeError("a worker process exited while starting")
            if ready is not None:
                for other in connections:
                    with contextlib.suppress(OSError):
                        other.send(None)  # a worker waiting for work exits
                self.close()
                raise FedlinkError(f"simulation workers did not start: {ready}")
        for index, conn in enumerate(connections):
            feeder = threading.Thread(
                target=self._feed, args=(conn,), name=f"worker-{index}", daemon=True
            )
            feeder.start()
            self._feeders.append(feeder)
        log.info(
            "%d worker processes (%s, %d threads each)",
            len(plan.devices),
            ", ".join(sorted(set(plan.devices))),
            plan.threads,
        )

    def submit(self, work: ClientWork, done: Done) -> None:
        """Run `work` on the next free worker; `done` gets its result or error (from a feeder
        thread)."""
        self._queue.put((work, done))

    def _feed(self, conn: Connection) -> None:
        with conn:
            while (item := self._queue.get()) is not None:
                work, done = item
                try:
                    conn.send(work)
                    result = conn.recv()
                except (EOFError, OSError):
                    done(RuntimeError(f"{work.identity}: the worker process running it died"))
                    return
                done(result)
            # Said, not left to the pipe's end: each worker also holds the ends of the workers
            # forked before it.
            conn.send(None)

    def close(self) -> None:
        for _ in self._feeders:
            self._queue.put(None)
        for feeder in self._feeders:
            feeder.join()
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
