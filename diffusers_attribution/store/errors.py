"""The errors a store raises: it does not match what it is used with, or its files are not what it says."""


class StoreMismatchError(ValueError):
    """A store is used with a model, adapter, projection or dataset other than the one it was built from."""


class CorruptStoreError(ValueError):
    """A store file is missing, truncated, not a regular file inside the store's folder, or does not match what
    config.json records (size, sha256, schema, rows, run)."""


class StoreBusyError(StoreMismatchError):
    """Another featurization is writing into the same folder (it holds the folder's lock)."""


class UntrustedReferenceError(StoreMismatchError):
    """A loaded store names something to load (checkpoints, an encoder) that the caller neither passed nor allowed."""


class NotAStoreError(CorruptStoreError, FileNotFoundError):
    """A folder without a store's config.json (e.g. an unfinished featurization): a `FileNotFoundError` too."""


class StoreChangedError(CorruptStoreError):
    """A store's files were replaced while it was being read (another process rewrote the store in place):
    nothing of the two stores is mixed; open the store again."""
