"""Image normalisation constants: the mean and std (RGB, for images in 0..1) each model family was
trained with. Imports nothing, so any module can take them.
"""

# CLIP's image normalisation (docs/method.md §3); the same numbers as open_clip's OPENAI_DATASET_MEAN/STD.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# torchvision's ImageNet backbones (the RPN's ResNets).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# detectron2's defaults, which every RPN RegionCLIP released keeps (configs/Base-RCNN-C4.yaml, -FPN.yaml):
# INPUT.FORMAT BGR, PIXEL_MEAN [103.530, 116.280, 123.675] (0..255), PIXEL_STD [1, 1, 1]; here in RGB
# order for images in 0..1.
DETECTRON2_PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
DETECTRON2_PIXEL_STD = (1 / 255, 1 / 255, 1 / 255)
