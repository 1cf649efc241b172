"""The ServerApp: aggregates the sites' Medformer weights round by round (``server.federation``).

Run by ``medfl run`` (in-process simulation) or by Flower's own tooling (``flwr run .`` /
``flwr run <app> <connection>``). Either way its settings come from the run config
(``server.settings``): ``medfl run`` sets the same keys through :func:`with_run_config`, because
``flwr.simulation.run_simulation`` passes an empty run config.

In a deployment (SuperNodes started with ``--node-config 'dataset=... data-dir=...'``) the sites
are discovered, not listed: the global model and the central evaluation cover exactly the
(dataset, size) pairs of the sites that answered discovery; the scenario's hospital list is
replaced by them (the scenario still supplies model, pretext, training, strategy, evaluation).
"""
from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Federation
from server.settings import settings_from_run_config

log = logging.getLogger("medfl.server")


def is_simulation(grid: Grid) -> bool:
    """True under Flower's simulation engine (``medfl run``, ``flwr run .``), False against SuperNodes."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # pragma: no cover - layout of another Flower version
        return type(grid).__name__ == "InMemoryGrid"
    return isinstance(grid, InMemoryGrid)


def run(grid: Grid, context: Context) -> None:
    """Discover the sites, run the rounds, evaluate and checkpoint, write the report."""
    settings = settings_from_run_config(dict(context.run_config), deployment=not is_simulation(grid))
    summary = Federation(settings).run(grid)
    log.info("finished %s: %d rounds, summary in %s", summary["scenario"], summary["rounds_completed"],
             settings.out_dir / "summary.json")


app = ServerApp()
app.main()(run)


def with_run_config(run_config: dict) -> ServerApp:
    """The same ServerApp, with ``run_config`` entries set on its context before it runs."""
    configured = ServerApp()

    @configured.main()
    def _run(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        run(grid, context)

    return configured
