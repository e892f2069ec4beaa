"""Model-level parallel pieces, below the model (docs/PARALLELISM.md): expert parallelism (`ep`)
and its wire formats (`wire`), multi-process start-up (`multihost`), and the XLA flags of the
two-micro-batch overlap (`xla_flags`). The trainer-level pieces (pipeline schedules, layout, dry
run, HLO accounting) live in `dsv3_jax/train/`."""
