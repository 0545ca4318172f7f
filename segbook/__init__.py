"""SegBook: does a backbone pretrained on full-body CT help on your 3D segmentation task, and by how much?"""

__version__ = "0.1.0"
