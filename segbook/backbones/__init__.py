"""Backbones other than STU-Net and the checkpoint formats their pretrained weights come in (`nnssl`: MIC-DKFZ's
self-supervised pretraining framework, the OpenMind ResEnc-L checkpoints)."""
