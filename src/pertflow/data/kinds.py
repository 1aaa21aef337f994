"""The kinds of split ``pertflow split --kind`` makes (:data:`pertflow.data.splits.BUILDERS` gives
each its builder); no imports, so that the command line lists them without reading any data."""

SPLIT_KINDS = ("random", "perturbations", "combinations", "gears", "context", "dose")
