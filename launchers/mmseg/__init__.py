"""The paper's segmentation path (optional extra): Segmenter ViT-S/16 trained with mmsegmentation.

``pip install .[mmseg]`` needs mmcv 2.1.0, which has no wheel for this torch: it compiles from source
(~33 min on 2 cores): ``pip install "setuptools<81" wheel ninja && MAX_JOBS=2 pip install --no-build-isolation
mmcv==2.1.0`` first. The cpu profile and the tests use the plain-torch Segmenter in bench_suite/finetune/segmenter.py.
"""
