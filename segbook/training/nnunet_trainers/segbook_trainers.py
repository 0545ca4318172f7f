"""Exposes segbook's trainers to nnU-Net's trainer lookup.

Point `nnUNet_extTrainer` at this folder (segbook does so itself; `eval "$(segbook env)"` does it in a shell) and
`nnUNetv2_train DATASET 3d_fullres all -tr SegbookTrainer_large_pretrained` or `nnUNetv2_predict ... -tr ...`
find the classes here: nnU-Net asks this module for the class by name, and every segbook trainer name (any model,
initialisation, recipe, seed and fraction) gives its class. The folder is deliberately not a Python package:
nnU-Net imports its modules by file.
"""

from segbook.training.trainers import trainer_class


def __getattr__(name: str):
    try:
        return trainer_class(name)
    except KeyError:
        raise AttributeError(name) from None
