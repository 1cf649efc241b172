"""MedMNIST data: the registry (from ``medmnist.INFO``), offline MD5-checked ``.npz`` files, in-memory
splits, partitions across simulated clients and random views.

``registry``   DatasetInfo per subset, get_info, the DataError family
``files``      where files live, official names and MD5s, load_splits / load_split, data_status
``splits``     MedMNISTSplit (uint8 in memory) and to_float (the one scaling to [-1, 1])
``partition``  partition_indices: IID or Dirichlet label-skew splits of a train split
``augment``    random_view: random views (flips, zoom, shift, contrast), 2D and 3D; named fine-tune policies
"""

from medformer.data.augment import AUGMENTATIONS, augment, random_view
from medformer.data.files import (DEFAULT_DIR, ENV_VAR, data_status, dataset_path, file_md5, file_name, load_split,
                                  load_splits, resolve_data_dir, verify_file)
from medformer.data.partition import partition_indices
from medformer.data.registry import (REGISTRY, SPLITS, ChecksumError, DataError, DatasetInfo, FormatError,
                                     MissingFileError, UnknownDatasetError, UnsupportedSizeError, get_info)
from medformer.data.splits import MedMNISTSplit, to_float

__all__ = [
    "DEFAULT_DIR", "ENV_VAR", "REGISTRY", "SPLITS", "ChecksumError", "DataError", "DatasetInfo", "FormatError",
    "MedMNISTSplit", "MissingFileError", "UnknownDatasetError", "UnsupportedSizeError", "data_status",
    "dataset_path", "file_md5", "file_name", "get_info", "load_split", "load_splits", "partition_indices",
    "random_view", "augment", "AUGMENTATIONS", "resolve_data_dir", "to_float", "verify_file",
]
