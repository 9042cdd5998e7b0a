"""Names of the ranking methods (kept free of heavy imports: the command line reads them for --help)."""

METHODS = ("unrolled", "influence_function", "tracin", "self_influence", "margin", "loss")
# Methods that score against validation data (the others need none).
NEEDS_VALIDATION = frozenset({"unrolled", "influence_function", "tracin"})
