"""Exposes segbook's trainers to nnU-Net's trainer lookup.

Point `nnUNet_extTrainer` at this folder (segbook does so itself; `eval "$(segbook env)"` does it in a shell) and
`nnUNetv2_train DATASET 3d_fullres all -tr SegbookTrainer_large_pretrained` or `nnUNetv2_predict ... -tr ...`
find the classes here. The folder is deliberately not a Python package: nnU-Net imports its modules by file.
"""

from segbook.training.trainers import TRAINERS

globals().update(TRAINERS)
