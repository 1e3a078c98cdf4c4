"""Data: on-disk formats, fetching, the Parquet cache, splits, scenarios and the datamodule."""
