"""Data for training: the streaming pretraining dataset, image-text pairs, COCO-format detection sets."""
