"""The run's machinery: what keeps a run safe and launchable. A reader need not open it to understand or copy an
algorithm. cli: flags and validation; launch: start(), the one call that starts a run; memory: plan and preflights;
checkpoint: checkpoints and resume; files: atomic writes and the verified chunked cache; sharding: full parameters
under FSDP; mathverify: math-verify with a timeout. Nothing here imports an algorithm file or benchmarks/."""
