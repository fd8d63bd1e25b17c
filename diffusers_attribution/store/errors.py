"""The two errors a store raises: it does not match what it is used with, or its files are not what it says."""


class StoreMismatchError(ValueError):
    """A store is used with a model, adapter, projection or dataset other than the one it was built from."""


class CorruptStoreError(ValueError):
    """A store file is missing, truncated, or does not match the size and sha256 recorded in config.json."""
