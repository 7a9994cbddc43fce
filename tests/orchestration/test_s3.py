"""Storage, landing zone and raw_images against a real S3 endpoint on 127.0.0.1."""

from __future__ import annotations

import io
from collections.abc import Iterator

import boto3
import pytest
from dagster import instance_for_test, materialize
from dagster_aws.s3 import S3Resource
from PIL import Image

from assets.ingestion import raw_images
from cvops_dagster.ingestion.ingest import raw_manifest_key
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.core.storage import ArtifactStorage
from resources.storage import ArtifactStore, ImageSource
from tests.s3server import s3_server


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        with s3_server(("cvops", "landing")) as url:
            yield url


def keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_round_trip_and_listing(endpoint: str) -> None:
    store = ArtifactStorage("s3://cvops/rt", endpoint_url=endpoint)
    store.write_bytes("a/b.bin", b"payload")
    store.write_json("a/c.json", {"k": [1, 2]})
    assert store.read_bytes("a/b.bin") == b"payload"
    assert store.read_json("a/c.json") == {"k": [1, 2]}
    assert store.list() == ["a/b.bin", "a/c.json"]
    assert store.exists("a/b.bin") and not store.exists("a/zzz")
    assert store.uri("a/b.bin") == "s3://cvops/rt/a/b.bin"
    assert keys(endpoint, "cvops", "rt/") == ["rt/a/b.bin", "rt/a/c.json"]


def test_exception_mid_write_leaves_no_object(endpoint: str) -> None:
    store = ArtifactStorage("s3://cvops/atomic", endpoint_url=endpoint)
    store.write_bytes("model.bin", b"good")
    with pytest.raises(RuntimeError):
        with store.open_write("new.bin") as f:
            f.write(b"x" * 1024)
            raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError):
        with store.open_write("model.bin") as f:
            f.write(b"bad")
            raise RuntimeError("crash mid-overwrite")
    assert keys(endpoint, "cvops", "atomic/") == ["atomic/model.bin"]
    assert store.read_bytes("model.bin") == b"good"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 99).save(buffer, format="PNG")
    return buffer.getvalue()


def test_raw_images_from_s3_landing_to_s3_artifacts(endpoint: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for key, body in {
        "in/b1/cat/a.png": _png(),
        "in/b1/dog/b.png": _png() + b"\0",
        "in/b1/dog/empty.png": b"",
        "in/b1/cat/../../escape.png": _png(),
        "in/b1/_READY": b"",
        "in/b2/cat/c.png": _png(),  # incomplete: no _READY
    }.items():
        client.put_object(Bucket="landing", Key=key, Body=body)

    zone = LandingZone("s3://landing/in", endpoint_url=endpoint)
    assert zone.list_complete_batches() == ["b1"]
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("image_batches", ["b1"])
        result = materialize(
            [raw_images],
            instance=instance,
            partition_key="b1",
            resources={
                "image_source": ImageSource(root="s3://landing/in", s3=S3Resource(endpoint_url=endpoint)),
                "artifact_store": ArtifactStore(root="s3://cvops/art", s3=S3Resource(endpoint_url=endpoint)),
            },
        )
        assert result.success
    store = ArtifactStorage("s3://cvops/art", endpoint_url=endpoint)
    manifest = store.read_parquet(raw_manifest_key("b1"))
    reasons = dict(zip(manifest["path"], manifest["reason"], strict=True))
    assert set(manifest.loc[manifest["status"] == "ingested", "path"]) == {"cat/a.png", "dog/b.png"}
    assert reasons["dog/empty.png"] == "empty_file"
    assert reasons["cat/../../escape.png"] == "path_escapes_batch"
    assert len(store.list("images")) == 2


def test_listing_sees_objects_written_by_another_client_after_an_earlier_listing(endpoint: str) -> None:
    """Ingestion trusts one listing to skip existing images: it must never be a stale one."""
    store = ArtifactStorage("s3://cvops/fresh-listing", endpoint_url=endpoint)
    store.write_bytes("images/a.png", b"a")
    assert store.list("images") == ["images/a.png"]
    other = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    other.put_object(Bucket="cvops", Key="fresh-listing/images/b.png", Body=b"b")
    other.delete_object(Bucket="cvops", Key="fresh-listing/images/a.png")
    assert store.list("images") == ["images/b.png"]


def _client_settings(client: object) -> dict[str, object]:
    """What a botocore (or aiobotocore) S3 client reaches S3 with."""
    meta = client.meta  # type: ignore[attr-defined]
    credentials = client._request_signer._credentials  # type: ignore[attr-defined]
    return {
        "endpoint": meta.endpoint_url,
        "region": meta.region_name,
        "retries": meta.config.retries,
        "access_key": credentials.access_key,
        "secret_key": credentials.secret_key,
        "token": credentials.token,
    }


def test_the_stores_reach_s3_exactly_as_dagster_aws_s3_resource_does() -> None:
    """One configuration: the s3fs client behind the stores equals S3Resource.get_client()."""
    import s3fs

    s3 = S3Resource(
        endpoint_url="http://127.0.0.1:9",
        region_name="eu-west-3",
        aws_access_key_id="AKID-RESOURCE",
        aws_secret_access_key="secret-resource",
        aws_session_token="token-resource",
        max_attempts=7,
    )
    store = ArtifactStore(root="s3://cvops/one-config", s3=s3).storage.fs
    zone = ImageSource(root="s3://landing/one-config", s3=s3).landing().fs
    boto = _client_settings(s3.get_client())
    assert boto["endpoint"] == "http://127.0.0.1:9" and boto["access_key"] == "AKID-RESOURCE"
    for fs in (store, zone):
        assert isinstance(fs, s3fs.S3FileSystem)
        fs.connect()
        assert _client_settings(fs.s3) == boto


def test_the_s3_resource_endpoint_is_the_one_used(endpoint: str, tmp_path: object) -> None:
    """Objects written by the artifact store are those the S3 resource's boto3 client lists, and
    a resource naming a dead endpoint fails the store: it is not read from anywhere else."""
    store = ArtifactStore(root="s3://cvops/via-resource", s3=S3Resource(endpoint_url=endpoint))
    store.write("a/b.bin", b"payload")
    listed = S3Resource(endpoint_url=endpoint).get_client().list_objects_v2(Bucket="cvops", Prefix="via-resource/")
    assert [o["Key"] for o in listed["Contents"]] == ["via-resource/a/b.bin"]
    dead = ArtifactStore(root="s3://cvops/via-resource", s3=S3Resource(endpoint_url="http://127.0.0.1:9", max_attempts=1))
    with pytest.raises(Exception):
        dead.read("a/b.bin")


def test_local_roots_ignore_the_s3_resource(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path)) / "artifacts"
    store = ArtifactStore(root=str(root), s3=S3Resource(endpoint_url="http://127.0.0.1:9"))
    store.write("k.bin", b"x")
    assert (root / "k.bin").read_bytes() == b"x"
