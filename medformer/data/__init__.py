"""MedMNIST data: the registry (from ``medmnist.INFO``), offline MD5-checked ``.npz`` files, in-memory
splits, partitions across simulated clients and random views.

``registry``   DatasetInfo per subset, get_info, the DataError family
``files``      where files live, official names and MD5s, load_splits / load_split, data_status
``splits``     MedMNISTSplit (uint8 in memory) and to_float (the one scaling to [-1, 1])
``partition``  partition_indices: IID or Dirichlet label-skew splits of a train split
``augment``    random_view: random views (flips, zoom, shift, contrast), 2D and 3D; named fine-tune policies
``cards``      dataset cards of a site's imported images: register_data_dir, public_card, register_public
``importing``  ``medfl data import`` (MONAI readers and transforms; imported only by that command)
"""

from medformer.data.augment import AUGMENTATIONS, augment, random_view
from medformer.data.cards import public_card, register_data_dir, register_public
from medformer.data.files import (DEFAULT_DIR, ENV_VAR, data_status, dataset_path, file_md5, file_name, load_split,
                                  load_splits, resolve_data_dir, verify_file)
from medformer.data.partition import partition_indices
from medformer.data.registry import (REGISTRY, SPLITS, ChecksumError, DataError, DatasetInfo, FormatError,
                                     MissingFileError, UnknownDatasetError, UnsupportedSizeError, get_info, register)
from medformer.data.splits import MedMNISTSplit, to_float

__all__ = [
    "DEFAULT_DIR", "ENV_VAR", "REGISTRY", "SPLITS", "ChecksumError", "DataError", "DatasetInfo", "FormatError",
    "MedMNISTSplit", "MissingFileError", "UnknownDatasetError", "UnsupportedSizeError", "data_status",
    "dataset_path", "file_md5", "file_name", "get_info", "load_split", "load_splits", "partition_indices",
    "AUGMENTATIONS", "augment", "public_card", "random_view", "register", "register_data_dir", "register_public",
    "resolve_data_dir", "to_float", "verify_file",
]
