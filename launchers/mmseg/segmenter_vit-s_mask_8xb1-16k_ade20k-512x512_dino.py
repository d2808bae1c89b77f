# mmsegmentation 1.x config: Segmenter ViT-S/16 with the mask-transformer decoder on ADE20K, its backbone
# initialised from DINO's DeiT-S/16 - the segmentation setting of ActiveFT (Xie et al., CVPR 2023, Sec. 4.2
# and appendix B.2): SGD lr 1e-3, momentum 0.9, batch 8, polynomial decay, 127 epochs of the selected subset
# (16k iterations at 5%, 32k at 10% of ADE20K's 20,210 training images).
#
# It follows mmsegmentation's configs/segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py (model,
# data pipeline, slide inference) with everything spelled out - no _base_ files - so it runs from this
# folder. What differs from that config: the checkpoint (DINO instead of the supervised ViT-S/16 of the
# Segmenter authors, converted to mmseg keys by launchers/mmseg/train.py), the normalisation (DINO was
# pretrained on ImageNet-normalised RGB, the Segmenter checkpoints on [-1, 1]), the schedule length, and
# the training subset (`ann_file`: the selected image names, written by launchers/mmseg/train.py).
#
# Sliding-window stride: 341 (2/3 of the window), the protocol of issue 12 and of mmseg's ViT ADE20K configs;
# mmsegmentation 1.2.2's own Segmenter configs (configs/_base_/models/segmenter_vit-b16_mask.py) slide with 480.
# The recipe field slide_stride (segmenter_paper) holds the same number for the plain-torch path.
#
# launchers/mmseg/train.py fills in data_root, ann_file, the checkpoint path, max_iters and the seed; run
# through it:  python -m launchers.mmseg.train --ade20k DIR --selection sel.json --dino-checkpoint
# dino_deitsmall16_pretrain.pth --work-dir DIR   (or torchrun --nproc_per_node 8 ... --launcher pytorch).

default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
tta_model = dict(type='SegTTAModel')

# ---------------------------------------------------------------- model
crop_size = (512, 512)
checkpoint = 'pretrain/dino_deitsmall16_mmseg.pth'  # converted by launchers/mmseg/train.py
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet statistics, as DINO was pretrained
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
backbone_norm_cfg = dict(type='LN', eps=1e-6, requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=checkpoint,
    backbone=dict(
        type='VisionTransformer',
        img_size=(512, 512),
        patch_size=16,
        in_channels=3,
        embed_dims=384,
        num_layers=12,
        num_heads=6,
        drop_path_rate=0.1,
        attn_drop_rate=0.0,
        drop_rate=0.0,
        final_norm=True,
        norm_cfg=backbone_norm_cfg,
        with_cls_token=True,
        interpolate_mode='bicubic',
    ),
    decode_head=dict(
        type='SegmenterMaskTransformerHead',
        in_channels=384,
        channels=384,
        num_classes=150,
        num_layers=2,
        num_heads=6,
        embed_dims=384,
        dropout_ratio=0.0,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)),  # see the note at the top
)

# ---------------------------------------------------------------- data (ADE20K, ADEChallengeData2016)
dataset_type = 'ADE20KDataset'
data_root = 'data/ade/ADEChallengeData2016'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=1,  # per GPU: 8 GPUs x 1 = the paper's batch 8 (train.py adjusts it to the GPU count)
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        ann_file='',  # the selected subset: one image name per line (train.py writes it)
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# ---------------------------------------------------------------- schedule (appendix B.2)
max_iters = 16000  # 5% of ADE20K; 32000 at 10% (train.py: 127 epochs of the selected subset at batch 8)
optimizer = dict(type='SGD', lr=0.001, momentum=0.9, weight_decay=0.0)
optim_wrapper = dict(type='OptimWrapper', optimizer=optimizer, clip_grad=None)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
