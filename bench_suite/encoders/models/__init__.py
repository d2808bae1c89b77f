"""The encoders: one file each, registered into ``bench_suite.encoders.registry`` when discovered."""
