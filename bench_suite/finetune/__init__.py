"""The finetuning library: train an encoder on a selected subset, evaluate it on the test split.

A plug-in over the core (shards, encoders, the runtime: rank, world, device, collectives; selections, profiles): the tables and the
``launchers.finetune`` CLI call it; it imports nothing above it. One job per module:

- ``recipes``      recipes as data: schema, defaults and checks, the catalogue (``recipes.yaml``), and the one
                   resolver of a named recipe (catalogue, then a profile's entry, then ``--set`` overrides);
- ``launch``       ``finetune()`` (one run: checks, build, train, metrics.json) and ``recipe_fn()`` (the tables'
                   recipe protocol); ``inputs`` does every check that can fail before a model is built;
- ``loop``         the training loop (epochs, optimiser steps, micro batches, evaluation and checkpoint cadence);
- ``samples``      the selected samples and the test split read from shards into memory;
- ``augment``      per-sample crop / flip drawn from (seed, epoch, id);
- ``backbone``     freezing, drop-path and the frozen-prefix token cache of timm backbones;
- ``optim``        optimiser, learning-rate schedule, mixed precision;
- ``checkpoint``   run fingerprints, checkpoint save / load;
- ``task``         the interface that ``classification`` (backbone + linear head, top-1) and ``segmentation``
                   (``segmenter``: Segmenter decoders, mIoU) implement;
- ``linear_probe`` logistic regression on frozen features (the cpu profile's fast recipe).

Nothing is imported here: ``import bench_suite.finetune.recipes`` stays cheap.
"""
