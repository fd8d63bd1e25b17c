"""Feature stores (nothing heavy is imported with the package; see the modules):

    errors.py      StoreMismatchError, CorruptStoreError
    files.py       file names, atomic writes, shards, the fitted projection file, digests
    format.py      FeatureStore: reading, validation, save_pretrained / from_pretrained / push_to_hub
    writer.py      the resumable, sharded featurization into a folder (accelerate-aware)
    backends.py    where stores live: a local folder, or a registered backend (the Hub's: hub.py)
    hub.py         dataset cards, push and pull on the Hugging Face Hub
"""

from .errors import CorruptStoreError, StoreMismatchError
from .format import FeatureStore

__all__ = ["CorruptStoreError", "FeatureStore", "StoreMismatchError"]
