"""Getting datasets in: reading source layouts, validating cases, the fixed test split, synthetic datasets, status.

    from segbook.data import import_dataset
    report = import_dataset(registry.get("613"), Path("~/Downloads/Task613_COVID-19-20"))

Heavy libraries (SimpleITK, nnU-Net) are imported inside the functions that need them.
"""

from segbook.data.importer import ImportReport, dataset_json, import_dataset, validate_source
from segbook.data.layouts import PlainSource, SourceCase, detect_layout, read_source
from segbook.data.problems import DatasetValidationError, Problem, ValidationReport
from segbook.data.split import Split, SplitChangedError, draw_split, read_split
from segbook.data.status import dataset_status
from segbook.data.synth import SynthSpec, TargetSpec, registry_entry, write_registry_file, write_synthetic_dataset
from segbook.data.validate import validate_cases

__all__ = [
    "DatasetValidationError", "ImportReport", "PlainSource", "Problem", "SourceCase", "Split", "SplitChangedError",
    "SynthSpec", "TargetSpec", "ValidationReport", "dataset_json", "dataset_status", "detect_layout", "draw_split",
    "import_dataset", "read_source", "read_split", "registry_entry", "validate_cases", "validate_source",
    "write_registry_file", "write_synthetic_dataset",
]
