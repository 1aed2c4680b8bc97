"""The names of `metadit`'s subcommands, in the order `metadit --help` lists them.

Below every layer so that what runs subcommands (a sweep's steps) can check a name without importing the CLI;
`metadit.cli` defines each one and a test keeps the two in step.
"""

SUBCOMMANDS = ("fit", "validate", "test", "predict", "gen", "eval", "sweep", "report", "judge", "ask", "diff", "bank", "bench")
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
