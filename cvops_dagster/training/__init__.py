"""Training: the model family, the Lightning system and data module, augmentations, hashed
checkpoints, evaluation, the Optuna search and the final training run."""
