"""The measurement store: SQLAlchemy tables for hardware, models, configurations, workloads,
campaigns, runs, requests, steps and fitted cost models (`database`), and the helpers that
record a measured run into them (`records`). Any SQLAlchemy URL; a local SQLite file by default."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Store": "database",
    "fingerprint": "database",
    "Run": "database",
    "Campaign": "database",
    "Experiment": "database",
    "Hardware": "database",
    "Model": "database",
    "EngineConfigRow": "database",
    "WorkloadRow": "database",
    "RequestRow": "database",
    "StepRow": "database",
    "CostModelRow": "database",
    "record_run": "records",
    "hardware_row": "records",
    "model_row": "records",
    "config_row": "records",
    "workload_row": "records",
})
