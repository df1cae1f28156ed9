"""The host side's public API, gathered from `experiment/`: build an
experiment, run it (the host loop), compare policies.

The CLI, `api.py`, notebooks and sweep scripts call these; each lives in a
small module of its own (build, params, workdir, outputs, loop, compare).
"""

from fedjax_tl.experiment.build import (Experiment, auto_tier_fast_path,
                                        build_experiment,
                                        device_population, dp_config,
                                        experiment_aggregator,
                                        experiment_mesh, experiment_policy,
                                        load_data, place_data)
from fedjax_tl.experiment.chunks import auto_chunk_size, choose_chunk_size
from fedjax_tl.experiment.compare import compare, format_comparison
from fedjax_tl.experiment.loop import rounds_in_call, run
from fedjax_tl.experiment.outputs import (Metrics, excluded_counts,
                                          fault_notes, privacy_record)
from fedjax_tl.experiment.params import (federated_params, initial_params,
                                         prepared_params)
from fedjax_tl.experiment.summary import (TARGET_KEYS, format_summary,
                                          summarize, time_to_target)
from fedjax_tl.experiment.workdir import (OUTPUTS, RESUMABLE_KEYS,
                                          check_workdir, start_workdir)

__all__ = [
    "Experiment", "Metrics", "OUTPUTS", "RESUMABLE_KEYS", "TARGET_KEYS",
    "auto_chunk_size", "auto_tier_fast_path", "build_experiment",
    "check_workdir", "choose_chunk_size", "compare", "device_population",
    "dp_config", "excluded_counts", "experiment_aggregator",
    "experiment_mesh", "experiment_policy", "fault_notes", "federated_params",
    "format_comparison", "format_summary", "initial_params", "load_data",
    "place_data", "prepared_params", "privacy_record", "rounds_in_call",
    "run", "start_workdir", "summarize", "time_to_target"]
