"""The datasets: one file each, registered into ``bench_suite.data.registry`` when discovered."""
