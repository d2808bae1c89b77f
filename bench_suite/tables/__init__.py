"""The paper's tables: one module per table (``tableN.py``) that registers a ``TableSpec``
(``bench_suite.tables.registry``); ``grid`` and ``common`` are the machinery they share."""
