"""The data IO manager: DataFrames as parquet, dicts/lists as JSON, under the storage base URI.

Weights never pass through it: checkpoint assets return a small reference (URI, step, MLflow run id,
data version) and downstream assets read the published directory themselves. Nothing is pickled: any
other type is an error naming the asset.
"""

from __future__ import annotations

import io
import json
import os

import dagster as dg
import pandas as pd

from npr_pipelines.storage import Storage


class NprIOManager(dg.ConfigurableIOManager):
    base_uri: str = ""

    def _storage(self) -> Storage:
        return Storage(self.base_uri or os.path.join(os.environ.get("NPR_HOME", ".npr"), "artifacts"))

    @staticmethod
    def _stem(context: dg.OutputContext | dg.InputContext) -> str:
        parts = ["io", *context.asset_key.path]
        if context.has_asset_partitions:
            keys = context.asset_partition_keys
            if len(keys) != 1:
                raise ValueError(
                    f"{context.asset_key.to_user_string()}: one partition per load, got {len(keys)}"
                )
            parts.append(str(keys[0]).replace("|", "__").replace("/", "_"))
        return "/".join(parts)

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        if obj is None:
            return
        storage, stem = self._storage(), self._stem(context)
        if isinstance(obj, pd.DataFrame):
            buf = io.BytesIO()
            obj.to_parquet(buf, index=False)
            uri = storage.write_bytes(f"{stem}.parquet", buf.getvalue())
            context.add_output_metadata({"dagster/row_count": len(obj), "path": dg.MetadataValue.path(uri)})
        elif isinstance(obj, dict | list):
            uri = storage.write_json(f"{stem}.json", obj)
            context.add_output_metadata({"path": dg.MetadataValue.path(uri)})
        else:
            raise TypeError(
                f"asset {context.asset_key.to_user_string()} returned {type(obj).__name__}; the IO manager "
                "stores DataFrames (parquet) and dicts/lists (JSON) only, never pickles"
            )

    def load_input(self, context: dg.InputContext) -> object:
        storage = self._storage()
        stem = self._stem(context)
        if storage.exists(f"{stem}.parquet"):
            return pd.read_parquet(io.BytesIO(storage.read_bytes(f"{stem}.parquet")))
        if storage.exists(f"{stem}.json"):
            return json.loads(storage.read_bytes(f"{stem}.json"))
        raise FileNotFoundError(
            f"no stored value for {context.asset_key.to_user_string()} at {storage.uri(stem)}.*"
        )
