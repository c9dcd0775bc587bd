"""What a user writes down: workloads, SLOs, search spaces and hardware specs, read from
YAML/JSON files and validated with errors that name the field."""

from planner._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "read_mapping": "files",
    "Workload": "workload",
    "WorkloadError": "workload",
    "RequestSpec": "workload",
    "SLO": "slo",
    "SLOError": "slo",
    "parse_slos": "slo",
    "summarize": "slo",
    "goodput": "slo",
    "SearchSpace": "search_space",
    "SearchSpaceError": "search_space",
    "HardwareSpec": "hardware",
    "HardwareSpecError": "hardware",
    "get_spec": "hardware",
    "load_specs": "hardware",
    "detect": "hardware",
})
