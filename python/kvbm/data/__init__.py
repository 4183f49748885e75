"""Data shipped with kvbm: the Mooncake conversation trace replayed by ``kvbm replay`` when no
trace is given (see ATTRIBUTION.md beside this file)."""
