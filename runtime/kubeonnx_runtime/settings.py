"""The runtime's settings: `KUBEONNX_*` environment variables or the same-named flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSuppress, SettingsConfigDict

# A model version is a URL path segment and a label value (the operator's CRD says the same).
VERSION_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
# Secrets are taken from a variable or a file, never from a flag: a command line is seen by
# every user of the machine (ps, /proc/PID/cmdline) and kept in shell histories.
SECRET_FLAGS = ("--async-redis-password", "--mirror-secret")
# Flags taking a URL, and where the credentials a URL could carry go instead: a URL holding
# them is refused as a flag (its variable, KUBEONNX_..., may hold the whole URL).
URL_FLAGS = {
    "--async-redis-url": "KUBEONNX_ASYNC_REDIS_PASSWORD or --async-redis-password-file",
    "--s3-endpoint": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "--model-uri": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
}


class ServeSettings(BaseSettings):
    """Settings of `kubeonnx serve`; flag `--model-uri` is variable `KUBEONNX_MODEL_URI`.
    Secrets are never flags: S3 keys are AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the
    Redis password KUBEONNX_ASYNC_REDIS_PASSWORD or a file (--async-redis-password-file), the
    router's mirror secret KUBEONNX_MIRROR_SECRET."""

    model_config = SettingsConfigDict(
        env_prefix="KUBEONNX_",
        cli_prog_name="kubeonnx serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=True,
        cli_hide_none_type=True,
        cli_parse_none_str="unset",
        cli_show_env_vars=True,
        extra="ignore",
        protected_namespaces=(),
    )

    model_uri: str | None = Field(
        None,
        description="where the model is: s3://BUCKET/KEY or file:///PATH (roles server and "
        "gateway)",
    )
    model_sha256: str | None = Field(
        None, description="expected sha256 of the model file; a mismatch refuses to start"
    )
    model_name: str = Field("model", description="the name clients use in /v2/models/{name}")
    model_version: str = Field(
        "1",
        pattern=VERSION_PATTERN,
        description="the model's Open Inference Protocol version: /v2/models/{name}/versions/"
        "{version}, its metadata's versions, its metrics' version label; 1-63 of A-Z, a-z, "
        "0-9, '.', '_' and '-', starting and ending with a letter or digit",
    )
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL")
    s3_region: str | None = Field(None, description="S3 region")
    device: Literal["cpu", "cuda"] = Field("cpu", description="execution provider")
    threads: int = Field(0, ge=0, description="intra-op threads; 0 = from the CPU quota")
    max_batch_size: int = Field(
        1,
        ge=1,
        description="rows merged into one model run; above 1 turns dynamic batching on, which "
        "is right only for models whose rows are independent (each output row depends on the "
        "same input row alone)",
    )
    max_batch_delay_ms: float = Field(2.0, ge=0, description="how long a request waits for company")
    max_queue: int = Field(256, ge=1, description="queued requests beyond which 503 is answered")
    max_request_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="largest request body, as sent and once inflated (gzip, deflate); 413 beyond",
    )
    max_json_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="largest JSON of a request (the body, or the binary extension's header) "
        "plus its BYTES tensors sent as binary data, once inflated: they become Python objects, "
        "ten to twenty times their size, decoded holding the interpreter lock; 413 beyond "
        "(numeric tensors sent as binary data are bounded by --max-request-bytes only)",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="largest request line and headers; 431 beyond"
    )
    read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds a request may take to arrive whole (a new connection: its first "
        "request); 408 and the connection closed beyond",
    )
    max_connections: int = Field(
        2048, ge=1, description="open connections beyond which requests are answered 503"
    )
    role: Literal["server", "gateway", "router"] = Field(
        "server",
        description="server: load the model and serve it (and consume the asynchronous queue, "
        "if any); gateway: no model, only take asynchronous requests and answer their status; "
        "router: no model, split requests between versions (--router-config)",
    )
    router_config: Path | None = Field(
        None, description="role router: its versions, weights, mirrors (JSON or YAML file)"
    )
    mirror_secret: CliSuppress[SecretStr | None] = Field(
        None,
        description="shared by the router and the versions' runtimes: a request bearing it in "
        "X-Kubeonnx-Mirror is the router's mirrored copy, answered but charged no quota (the "
        "variable KUBEONNX_MIRROR_SECRET only, never a flag)",
    )
    mirror_secret_file: Path | None = Field(
        None,
        description="file holding the mirror secret (a mounted Secret key), instead of "
        "KUBEONNX_MIRROR_SECRET",
    )
    async_redis_url: str | None = Field(
        None, description="Redis holding the asynchronous request stream; unset: no async"
    )
    async_redis_password: CliSuppress[SecretStr | None] = Field(
        None, description="password of that Redis (the variable only, never a flag)"
    )
    async_redis_password_file: Path | None = Field(
        None,
        description="file holding the password of that Redis (a mounted Secret key), instead of "
        "KUBEONNX_ASYNC_REDIS_PASSWORD",
    )
    async_prefix: str | None = Field(
        None,
        description="prefix of the stream and record keys; default kubeonnx:{MODEL_NAME}",
    )
    async_max_attempts: int = Field(
        3, ge=1, le=100, description="deliveries of a request before it is dead-lettered"
    )
    async_result_ttl_s: int = Field(
        3600, ge=1, description="seconds a result is kept after it is written"
    )
    async_claim_after_s: float = Field(
        300.0,
        gt=0,
        description="seconds a request may stay unacknowledged before another replica takes "
        "it over (the replica running it renews its claim every third of it)",
    )
    async_max_queued: int = Field(
        100000, ge=1, description="queued asynchronous requests beyond which 503 is answered"
    )
    async_max_entry_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="largest asynchronous request body, as queued (inflated); 413 beyond",
    )
    async_max_result_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="largest asynchronous result kept; a larger one makes the request failed "
        "(413) instead of being written",
    )
    async_max_queued_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1024,
        description="bytes of request bodies the queue holds at most, all entries together; "
        "503 beyond",
    )
    async_dead_letter_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="bytes of request bodies the dead-letter stream keeps; the oldest are trimmed",
    )
    async_dead_letter_max_length: int = Field(
        1000,
        ge=1,
        description="entries the dead-letter stream keeps (each with its request's body); the "
        "oldest are trimmed",
    )
    async_max_callbacks: int = Field(
        64,
        ge=1,
        description="callbacks in flight at once, apart from inference; beyond, a callback is "
        "made when its request is claimed again",
    )
    async_concurrency: int = Field(
        0, ge=0, description="asynchronous requests processed at once; 0 = twice the batch size"
    )
    async_callback_hosts: str = Field(
        "",
        description="comma-separated hosts that callbacks may call (*.example.com for a "
        "domain); empty: callbacks are refused",
    )
    ledger_spill_dir: Path | None = Field(
        None,
        description="where usage rows still waiting for the ledger's PostgreSQL are written at "
        "shutdown, and replayed from at start; default CACHE_DIR/ledger",
    )
    processing: str | None = Field(
        None,
        description="image endpoints' processing (the InferenceModel's spec.processing, JSON); "
        "unset: no /predict",
    )
    labels_file: Path | None = Field(
        None, description="class labels, one per line in class order, for /predict"
    )
    max_images_per_request: int = Field(
        64, ge=1, le=4096, description="images /predict/batch takes in one request"
    )
    max_jpeg_scans: int = Field(
        32,
        ge=1,
        description="scans a JPEG may have: each is a pass over the whole image (libjpeg's "
        "standard progression makes 10); 400 beyond",
    )
    max_decode_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1024 * 1024,
        description="memory the image decodes of the process may hold at once, estimated from "
        "each image's header before it is decoded; decodes beyond it wait their turn, and an "
        "image that needs more than all of it is refused (400)",
    )
    quota_config: Path | None = Field(None, description="mounted quota configuration file")
    quota_reload_s: float = Field(
        5.0, gt=0, description="seconds between checks of the quota configuration for changes"
    )
    route_prefix: str = Field(
        "", description="path prefix an Ingress routes under; served as well as the bare paths"
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8080, ge=1, le=65535, description="port to listen on")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="port serving /metrics alone (it names tenants), which the main port then "
        "does not serve; unset: /metrics on the main port",
    )
    cache_dir: Path = Field(Path("/var/cache/kubeonnx"), description="model download cache")
    termination_log: Path | None = Field(
        None,
        description="where a fatal start-up error is also written, as one line (the operator's "
        "Deployment sets /dev/termination-log); unset: standard error only",
    )
    drain_seconds: float = Field(
        5.0, ge=0, description="after SIGTERM: seconds to answer not-ready before closing"
    )
    grace_seconds: float = Field(
        30.0,
        ge=10,
        description="the pod's terminationGracePeriodSeconds: the drain, the requests in "
        "flight and the usage ledger's last write and spill all end within it (the default is "
        "the shorter of the two the operator renders)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_sha256")
    @classmethod
    def _hex64(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
            raise ValueError("must be 64 hexadecimal characters")
        return value.lower()

    @model_validator(mode="after")
    def _password_file(self) -> ServeSettings:
        if self.async_redis_password_file is not None:
            try:
                text = self.async_redis_password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read the Redis password file: {exc}") from None
            self.async_redis_password = SecretStr(text)
        if self.mirror_secret_file is not None:
            try:
                text = self.mirror_secret_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read the mirror secret file: {exc}") from None
            self.mirror_secret = SecretStr(text)
        return self
