"""Experiments built on the pipeline: the demo, the synthetic cohort study, the fibre
study, the held-out fit evaluation and the solver benchmark. Each is a library function
that a `rtjax` command or a thin script in `scripts/` calls."""
