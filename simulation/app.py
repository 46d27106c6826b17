"""`fedlink simulate`: the coordinator's run (round engine, metrics, checkpoints, results) with
N virtual clients instead of a listener, their tasks run by a pool of workers."""

from __future__ import annotations

import logging
import threading

from fedlink.common.errors import ConfigError
from fedlink.server.app import (
    EXIT_STORAGE_FAILURE,
    CoordinatorRun,
    exit_status,
    install_signal_handlers,
    locked_run_dirs,
    restore_signal_handlers,
)
from fedlink.server.report import table_header
from fedlink.simulation.clients import ClientSettings
from fedlink.simulation.config import SimulationConfig, client_name
from fedlink.simulation.driver import VirtualClients, Workers
from fedlink.simulation.workers import ProcessWorkers, worker_plan

log = logging.getLogger(__name__)

# Exit status when a virtual client's task raised: the task has a bug to fix.
EXIT_TASK_FAILURE = 1


def client_settings(config: SimulationConfig) -> ClientSettings:
    """What every virtual client is told and holds, from the simulation's settings."""
    return ClientSettings(
        task=config.task,
        hyperparameters=config.hyperparameters(),
        # The strategy's settings too (FedProx's mu), as every real client's task header has.
        task_config=dict(config.task_settings(config.build_strategy())),
        partition=config.partition,
        num_clients=config.num_clients,
        seed=config.seed,
        data_dir=config.data_dir,
        state_dir=config.state_dir / "clients",
    )


def run_simulation(config: SimulationConfig) -> int:
    """Run the federation `config` describes with virtual clients; the exit status (0: the run
    completed, as `fedlink server`'s). Results land in run_dir like a coordinator's."""
    with locked_run_dirs(config):
        workers = _start_workers(config)
        try:
            run = CoordinatorRun.open(config)
            try:
                if run.config.tensor_selection().partial:
                    raise ConfigError(
                        f"task {config.task!r} exchanges only some tensors (partial models, "
                        "FedBN): not simulated yet; run it with `fedlink server`"
                    )
                return _simulate(config, run, workers)
            finally:
                run.close()
        finally:
            workers.close()


def _start_workers(config: SimulationConfig) -> Workers:
    settings = client_settings(config)
    if config.backend == "ray":
        from fedlink.simulation.ray_workers import RayWorkers

        return RayWorkers(
            settings,
            config.ray_address,
            config.workers,
            config.device,
            config.workers_per_gpu,
            config.worker_threads,
        )
    plan = worker_plan(config.workers, config.device, config.workers_per_gpu, config.worker_threads)
    # Forked first, before this process starts a thread of its own.
    return ProcessWorkers(settings, plan)


def _simulate(config: SimulationConfig, run: CoordinatorRun, workers: Workers) -> int:
    engine = run.engine
    stop = threading.Event()

    def stop_run(reason: str) -> None:
        log.error("%s: stopping the simulation", reason)
        stop.set()

    names = [client_name(i, config.num_clients) for i in range(config.num_clients)]
    clients = VirtualClients(engine, names, workers, config.heartbeat_interval_seconds, stop_run)
    clients.join()
    done = threading.Event()
    driver = threading.Thread(target=clients.run, args=(done,), name="virtual-clients")
    driver.start()
    previous = install_signal_handlers(stop_run)
    try:
        print(table_header(), flush=True)
        summary = engine.run(stop)
    finally:
        restore_signal_handlers(previous)
        done.set()
        clients.close()
        driver.join()
    if summary.storage_failure is not None:
        return EXIT_STORAGE_FAILURE
    run.publish(config, summary)
    if clients.failure is not None:
        log.error("a virtual client's task failed: %s", clients.failure)
        return EXIT_TASK_FAILURE
    return exit_status(config, summary)
