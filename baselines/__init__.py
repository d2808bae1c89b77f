"""Selection methods: one file per method, all reachable through bench_suite.methods.registry."""
