"""Evaluation: prediction of the test split and the segmentation metrics (Dice, NSD, HD95)."""
