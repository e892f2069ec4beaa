"""Parallelism beyond GSPMD's rules table (docs/PARALLELISM.md): expert parallelism (`ep`) and its
wire formats (`wire`), pipeline schedules (`pipeline`), two-micro-batch overlap (`overlap`), which
step and shardings a mesh gets (`layout`), multi-process start-up (`multihost`), compiled-HLO
accounting (`hlo`) and `train.py --dry_run` (`dryrun`)."""
