"""Fixed tasks: one network on one data set, named as in the reference library.

``image_mlp``: ``ImageMLP_*`` multi-layer perceptrons; ``conv``: ``Conv_*`` small conv
nets; both on ``spmd_lopt.datasets`` image data drawn on device. The shared task class
(loss, batch sampling, normalizer) is ``classification.ImageClassificationTask``.
"""
