"""The run's machinery: what keeps a run safe and launchable. A reader need not open it to understand or copy an
algorithm. Nothing here imports an algorithm file or benchmarks/."""
