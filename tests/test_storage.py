"""The Storage value: its retry policy is its own (not the process's), it travels pickled to Ray
workers, its region reaches the S3 client, and its batched delete."""

from __future__ import annotations

import pickle

import pytest

from pipeline import storage as storage_module
from pipeline.spec import parse_spec
from pipeline.storage import Storage, StorageUnavailable


class _Flaky:
    """A call that fails with a dropped connection `failures` times, then answers."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("connection reset")
        return "answer"


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays asked for, without waiting them."""
    asked: list[float] = []
    monkeypatch.setattr(storage_module.time, "sleep", asked.append)
    return asked


def test_two_values_in_one_process_keep_their_own_retry_policies(sleeps):
    patient = Storage(retries=5, retry_delay_s=0.2)
    hasty = Storage(retries=2, retry_delay_s=0.01)

    assert patient.retry(_Flaky(3), what="reading a") == "answer"
    assert sleeps == [0.2, 0.4, 0.8]
    sleeps.clear()

    flaky = _Flaky(3)
    with pytest.raises(StorageUnavailable, match="reading b: storage unreachable after 2 att"):
        hasty.retry(flaky, what="reading b")
    assert (flaky.calls, sleeps) == (2, [0.01])
    sleeps.clear()

    # the hasty value used after it changed nothing for the patient one
    assert patient.retry(_Flaky(4), what="reading a") == "answer"
    assert sleeps == [0.2, 0.4, 0.8, 1.6]


def test_an_answer_is_not_retried(sleeps):
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        Storage().retry(missing, what="reading c")
    assert (len(calls), sleeps) == (1, [])


def test_a_value_without_any_attempt_is_refused():
    with pytest.raises(ValueError, match="retries must be at least 1"):
        Storage(retries=0)


def test_from_spec_takes_every_field_of_the_storage_section():
    spec = parse_spec(
        {
            "source": {"uri": "x"},
            "explainers": [{"name": "saliency"}],
            "storage": {
                "endpoint_url": "http://store:9000",
                "region": "eu-west-3",
                "retries": 3,
                "retry_delay_s": 0.2,
            },
        }
    )
    assert Storage.from_spec(spec.storage) == Storage("http://store:9000", "eu-west-3", 3, 0.2)
    defaults = parse_spec({"source": {"uri": "x"}, "explainers": [{"name": "saliency"}]})
    assert Storage.from_spec(defaults.storage) == Storage()


def test_a_pickled_value_reads_and_writes_on_its_endpoint(s3, s3_endpoint, monkeypatch):
    # only the value's own endpoint can lead to the store
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3.create_bucket(Bucket="storage-pickle")
    sent = Storage(endpoint_url=s3_endpoint, retries=2, retry_delay_s=0.01)
    received = pickle.loads(pickle.dumps(sent))
    assert received == sent
    received.write_bytes_atomic("s3://storage-pickle/a/b.bin", b"payload")
    assert s3.get_object(Bucket="storage-pickle", Key="a/b.bin")["Body"].read() == b"payload"
    assert received.read_bytes("s3://storage-pickle/a/b.bin") == b"payload"
    with pytest.raises(FileNotFoundError):
        received.read_bytes("s3://storage-pickle/a/absent.bin")


def test_the_region_reaches_the_s3_client(s3_endpoint):
    placed = Storage(endpoint_url=s3_endpoint, region="eu-west-3")
    assert placed.options("s3://b/k")["client_kwargs"] == {"region_name": "eu-west-3"}
    fs, path = placed.filesystem("s3://b/k")
    assert path == "b/k"
    assert fs.client_kwargs == {"region_name": "eu-west-3"}
    fs.connect()
    assert fs.s3.meta.region_name == "eu-west-3"
    # without a region the client keeps the environment's; the two are different filesystems
    anywhere, _ = Storage(endpoint_url=s3_endpoint).filesystem("s3://b/k")
    assert "client_kwargs" not in Storage(endpoint_url=s3_endpoint).options("s3://b/k")
    assert anywhere is not fs
    assert Storage(region="eu-west-3").options("/local/path") == {}


def test_the_environments_endpoint_serves_a_value_without_one(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    assert Storage().options("s3://b/k")["endpoint_url"] == "http://from-env:9000"
    assert Storage("http://own:9000").options("s3://b/k")["endpoint_url"] == "http://own:9000"
    fs, _ = Storage().filesystem("s3://b/k")
    assert fs.endpoint_url == "http://from-env:9000"


def test_remove_many_deletes_in_batches_and_tolerates_absent_objects(s3, s3_endpoint, monkeypatch):
    bucket = "storage-remove"
    s3.create_bucket(Bucket=bucket)
    for key in ("a/1", "a/2", "a/3", "a/4", "keep/1"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    store = Storage(endpoint_url=s3_endpoint)
    fs, _ = store.filesystem(f"s3://{bucket}")
    batches: list[list[str]] = []
    real_rm = fs.rm

    def rm(paths, *args, **kwargs):
        batches.append(list(paths))
        return real_rm(paths, *args, **kwargs)

    monkeypatch.setattr(fs, "rm", rm)
    monkeypatch.setattr(storage_module, "DELETE_BATCH", 2)
    doomed = ["a/1", "a/2", "a/absent", "a/3", "gone/too"]
    store.remove_many(f"s3://{bucket}/{key}" for key in doomed)
    assert batches == [
        [f"{bucket}/a/1", f"{bucket}/a/2"],
        [f"{bucket}/a/absent", f"{bucket}/a/3"],
        [f"{bucket}/gone/too"],
    ]
    left = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert left == {"a/4", "keep/1"}
    store.remove_many([])  # nothing to do, no request
    assert len(batches) == 3


def test_remove_many_on_a_local_disk(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"x")
    Storage().remove_many([str(tmp_path / "a"), f"file://{tmp_path}/b", str(tmp_path / "absent")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
