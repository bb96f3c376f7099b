"""Image-classification data sets that live on device and are sampled on device.

- ``sources``: where each set's files are and how they are read (IDX, CIFAR-10 pickles,
  SVHN ``.mat``, TFDS's cache, the embedded ``digits8``); ``DatasetNotFoundError``.
- ``transforms``: host-side pre-processing (scaling, bilinear resize, grayscale) and the
  train / inner_valid / outer_valid / test splits.
- ``device_dataset``: ``ImageDataset``, the on-device pytree of every split with a pure
  ``sample_batch(key, split)``, and the loaders ``image_dataset``, ``mnist_datasets``, ...
- ``digits_variants``: four distinct tasks derived from the embedded digits.
- ``synthetic``: random images labelled by a fixed random teacher (no files).

Every public name is importable from here (``spmd_lopt.datasets.X``).
"""

from spmd_lopt.datasets import digits_variants
from spmd_lopt.datasets import device_dataset
from spmd_lopt.datasets import synthetic
from spmd_lopt.datasets.digits_variants import DIGITS8_VARIANTS, digits8_variant_datasets
from spmd_lopt.datasets.device_dataset import (
    ImageDataset, cifar10_datasets, digits8_datasets, fashion_mnist_datasets, image_dataset,
    mnist_datasets, svhn_cropped_datasets)
from spmd_lopt.datasets.sources import (
    CIFAR10_FILES, MNIST_FILES, SVHN_FILES, DatasetNotFoundError, available_datasets,
    default_data_dir, load_raw, read_idx)
from spmd_lopt.datasets.synthetic import synthetic_datasets
from spmd_lopt.datasets.transforms import (
    GRAY_WEIGHTS, SPLITS, resize_bilinear, split_arrays, to_grayscale)


def clear_cache() -> None:
  """Drop cached host and device arrays (e.g. after replacing files in ``data_dir``)."""
  for module in (device_dataset, digits_variants, synthetic):
    module.clear_cache()
