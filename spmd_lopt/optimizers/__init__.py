"""Hand-designed optimizers behind the reference library's ``Optimizer`` interface."""
