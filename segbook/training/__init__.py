"""Training runs: nnU-Net trainers for STU-Net and the baseline, run manifests, and `finetune()`."""
