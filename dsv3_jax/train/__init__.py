"""Training: the loss (`loss`), the train state (`state`), the GSPMD step (`step`) and the pipeline
schedules (`pipeline`), which step and layout a mesh gets (`layout`), the optimizer (`optim`), the
aux-loss-free bias update (`balance`), metrics, preemption, the dry run (`dryrun`, `hlo`) and the
`dsv3-train` command (`main`)."""
