"""ContentAddressedStorage as Prefect sees it: block standards, keys, and values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.filesystems import LocalFileSystem
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from uncool_prefect import ContentAddressedStorage
from uncool_prefect.store import CorruptObjectError, InvalidKeyError, ObjectNotFoundError


class TestContentAddressedStorageStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[ContentAddressedStorage]:
        return ContentAddressedStorage

    def test_has_a_valid_image(self, block: type[ContentAddressedStorage]) -> None:
        # NOTE: the suite's own version downloads the logo, and CI has no
        # network. We reuse the image Prefect ships for LocalFileSystem (which
        # its suite validates), so checking it is the same asset is enough.
        assert block._logo_url == LocalFileSystem._logo_url


@pytest.fixture
def block(tmp_path: Path) -> ContentAddressedStorage:
    return ContentAddressedStorage(basepath=str(tmp_path / "store"))


def _record(value: str, key: str, block_id: str | None = None) -> bytes:
    """A ResultRecord as Prefect serializes it without key_storage."""
    return json.dumps({
        "metadata": {
            "storage_key": key, "expiration": None,
            "serializer": {"type": "json", "jsonlib": "json", "object_encoder":
                           "prefect.serializers.prefect_json_object_encoder",
                           "object_decoder": "prefect.serializers.prefect_json_object_decoder",
                           "dumps_kwargs": {}, "loads_kwargs": {}},
            "prefect_version": "3.9.1", "storage_block_id": block_id,
        },
        "result": value,
    }).encode()


def test_write_then_read_returns_the_same_record(block: ContentAddressedStorage) -> None:
    content = _record('{"accuracy": 0.91}', "abc")
    block.write_path("abc", content, _sync=True)
    assert json.loads(block.read_path("abc", _sync=True)) == json.loads(content)


def test_async_twins_work(block: ContentAddressedStorage) -> None:
    import asyncio

    async def roundtrip() -> bytes:
        await block.awrite_path("k", b"raw bytes")
        return await block.aread_path("k")

    assert asyncio.run(roundtrip()) == b"raw bytes"


def test_same_value_from_different_keys_and_blocks_is_stored_once(tmp_path: Path) -> None:
    first = ContentAddressedStorage(basepath=str(tmp_path / "store"))
    second = ContentAddressedStorage(basepath=str(tmp_path / "store"))
    # Same value, different keys and different storage_block_id in the record.
    block_1, block_2 = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
    first.write_path("key-1", _record("[1, 2, 3]", "key-1", block_1), _sync=True)
    second.write_path("key-2", _record("[1, 2, 3]", "key-2", block_2), _sync=True)
    first.write_path("key-3", b"[1, 2, 3]", _sync=True)  # key_storage style: the bare value
    objects = list(first.store.ls())
    assert [o.size for o in objects] == [len(b"[1, 2, 3]")]
    usage = first.store.du()
    assert (usage.objects, usage.refs) == (1, 3)


def test_record_json_is_not_confused_with_a_user_value(block: ContentAddressedStorage) -> None:
    # A value that merely looks like a record (extra keys) is stored verbatim.
    content = json.dumps({"metadata": {"serializer": "x"}, "result": "v", "other": 1}).encode()
    block.write_path("lookalike", content, _sync=True)
    assert block.read_path("lookalike", _sync=True) == content


BAD_KEYS = [
    "", "..", "../escape", "a/../../b", "/etc/passwd", "%2e%2e/x", "a/%2E%2E/b",
    "a\\b", "..\\x", "a\x00b", ".", "./", "//", "a/%2e/b",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_rejected_before_any_io(tmp_path: Path, key: str) -> None:
    block = ContentAddressedStorage(basepath=str(tmp_path / "store"))
    with pytest.raises(InvalidKeyError) as info:
        block.write_path(key, b"x", _sync=True)
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidKeyError):
        block.read_path(key, _sync=True)
    assert not (tmp_path / "store").exists()  # nothing created, not even the folder


@pytest.mark.parametrize(("spelled", "key"), [("./out/1", "out/1"), ("a//b-1", "a/b-1"),
                                             ("a/./b", "a/b")])
def test_harmless_spellings_name_the_same_key(block: ContentAddressedStorage, spelled: str,
                                              key: str) -> None:
    """What LocalFileSystem accepts as a name inside the base (Prefect's result_storage_key
    templates make such names) is the same key here, not a refusal that loses the cache."""
    block.write_path(spelled, b"value", _sync=True)
    assert block.read_path(key, _sync=True) == b"value"
    assert block.read_path(spelled, _sync=True) == b"value"


def test_missing_key_is_file_not_found(block: ContentAddressedStorage) -> None:
    with pytest.raises(ObjectNotFoundError) as info:
        block.read_path("never-written", _sync=True)
    assert isinstance(info.value, FileNotFoundError)


def test_corrupt_result_is_refused(block: ContentAddressedStorage) -> None:
    block.write_path("k", _record('"hello"', "k"), _sync=True)
    (info,) = list(block.store.ls())
    path = Path(block.store.url_of(info.name))
    path.chmod(0o644)
    path.write_bytes(b'"jello"')
    with pytest.raises(CorruptObjectError):
        block.read_path("k", _sync=True)


def test_secrets_in_storage_options_are_not_shown(tmp_path: Path) -> None:
    block = ContentAddressedStorage(
        basepath=str(tmp_path), storage_options={"secret": "hunter2", "key": "AKIA"}
    )
    assert "hunter2" not in repr(block) and "hunter2" not in str(block.model_dump())
    assert block._fsspec_options()["secret"] == "hunter2"


def test_aws_credentials_reach_s3fs(tmp_path: Path) -> None:
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    creds = AwsCredentials(
        aws_access_key_id="AKIA", aws_secret_access_key="s3cr3t", region_name="eu-west-1",
        aws_client_parameters=AwsClientParameters(endpoint_url="http://127.0.0.1:9"),
    )
    block = ContentAddressedStorage(basepath="s3://bucket/prefix", aws_credentials=creds)
    options = block._fsspec_options()
    assert options["key"] == "AKIA" and options["secret"] == "s3cr3t"
    assert options["client_kwargs"] == {"region_name": "eu-west-1",
                                        "endpoint_url": "http://127.0.0.1:9"}


def test_objects_named_inside_a_result_survive_gc(block: ContentAddressedStorage, tmp_path: Path) -> None:
    """A stage returns a dataset id; gc must keep the dataset, not just the result."""
    from prefect.serializers import PickleSerializer

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("issue title")
    dataset = block.store.put_dir(data)
    unrelated = block.store.put_bytes(b"garbage")
    value = {"dataset": dataset.name, "examples": 1}
    pickled = PickleSerializer().dumps(value).decode()
    record = json.loads(_record(pickled, "k"))
    record["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle"}
    block.write_path("k", json.dumps(record).encode(), _sync=True)

    report = block.store.gc(grace=0)
    assert report.removed == [unrelated.oid]
    assert block.store.get_dir(dataset.name, tmp_path / "out").joinpath("a.txt").exists()
