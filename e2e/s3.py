"""The S3 stand-in: moto in server mode on loopback, holding the generated models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from e2e.cluster import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"


class LocalS3:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> LocalS3:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line a request otherwise
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def put_models(
        self, models: dict[str, Path], bucket: str = "models", keys: dict[str, str] | None = None
    ) -> None:
        """Upload each model to KEY (default <name>/model.onnx) in the bucket."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for name, path in models.items():
            key = (keys or {}).get(name, f"{name}/model.onnx")
            client.upload_file(str(path), bucket, key)
