"""Inner problems that learned optimizers are meta-trained on."""
