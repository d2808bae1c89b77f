"""Selection methods: one file per method, all reachable through baselines.registry."""
