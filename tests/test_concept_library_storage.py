"""The concept library in object storage, shared by the learner replicas of a fleet: against the same emulators as
`ice batch` (tests/test_batch_object_storage.py: moto for S3, fake-gcs-server for GCS, Azurite for Azure Blob
Storage). Per store, two replicas' views of one bucket: what one publishes the other lists and loads (each file
checked against its entry's SHA-256), pages stay right while entries come and go, a deletion is seen at once.
Then, on S3, two real learners: a job learned on one is listed and composed on the other, also once the first
replica and its disk are gone."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from test_batch_object_storage import _environment, _moto, bucket  # noqa: F401 - `bucket`: the fixture
from test_concept_library import Learner, _learner, _request, _scene, job_dir, ref

from ice.concept_names import Ref
from ice.learner.v1 import learner_pb2
from services.common.errors import NotFound, Unavailable
from services.learner.artifacts import EMBEDS, LORA
from services.learner.library import Library, list_page


def test_replicas_share_the_library_in_the_bucket(bucket, tmp_path):  # noqa: F811
    url = bucket.url("library-test")
    one, two = Library(url, tmp_path / "cache-1"), Library(url, tmp_path / "cache-2")
    jobs = [f"{k:032x}" for k in (1, 2, 3)]
    for k, job in enumerate(jobs):
        one.publish(job, job_dir(tmp_path / "jobs", job, ["cup", "table"][: 1 + k % 2], k), create_time=100.0 + k)
    keys = bucket.keys("library-test/")
    assert f"library-test/entries/{jobs[0]}.json" in keys
    assert f"library-test/files/{jobs[1]}/{LORA}" in keys and f"library-test/files/{jobs[1]}/crops/c1.png" in keys

    # the other replica lists every concept, oldest job first, and pages through them with tokens
    seen = [(c.job_id, c.concept_id) for e in two.entries() for c in e.concepts()]
    assert seen == [(jobs[0], "c0"), (jobs[1], "c0"), (jobs[1], "c1"), (jobs[2], "c0")]
    page, token = list_page(two, None, "attribute = color", 2, "")
    assert [(c.job_id, c.concept_id) for c in page] == seen[:2] and token
    one.remove(jobs[0])  # a deletion between two pages does not shift the next page
    page, token = list_page(two, None, "attribute = color", 2, token)
    assert [(c.job_id, c.concept_id) for c in page] == seen[2:] and not token
    assert two.entry(jobs[0]) is None and not bucket.keys(f"library-test/files/{jobs[0]}/")
    with pytest.raises(NotFound):
        two.concept(Ref(jobs[0], "c0"))

    # files come down once into the replica's cache, checked against the entry
    entry = two.entry(jobs[1])
    path = two.file(entry, EMBEDS)
    assert path.is_relative_to(tmp_path / "cache-2") and path.read_bytes() == bucket.get(
        f"library-test/files/{jobs[1]}/{EMBEDS}")
    bucket.put(f"library-test/files/{jobs[2]}/{EMBEDS}", b"not the tokens")  # corrupted in the bucket
    with pytest.raises(Unavailable, match="does not match"):
        two.file(two.entry(jobs[2]), EMBEDS)
    assert not list((tmp_path / "cache-2" / jobs[2]).rglob("*.part"))  # nothing half-downloaded is left
    assert len(list_page(two, None, "", 50, "")[0]) == 3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from conftest import free_port

    with _moto(free_port(), tmp_path_factory.mktemp("s3")) as store, _environment(store.env):
        store.create()
        yield store


def test_a_job_learned_on_one_replica_is_composed_on_another_also_once_the_first_is_gone(s3, tiny_bundle_dir,
                                                                                         tmp_path):
    library = s3.url("fleet-library")
    stores = [tmp_path / "replica-1", tmp_path / "replica-2"]
    first, second = (Learner(_learner(Path(tiny_bundle_dir), st, concept_library=library), st) for st in stores)
    try:
        job = first.learn(_request(_scene(5), ["cup"], seed=5))
        (listed,) = second.concepts()
        assert listed.job_id == job and listed.noun == "cup"
        prompt = f"a photo of {ref(job)} in {ref(job, attribute='color')} color"
        composed = second.compose(prompt, delta=learner_pb2.COMPOSITION_DELTA_ONE_JOB, delta_job=f"operations/{job}")
        assert (stores[1] / "library-cache" / job / LORA).is_file()  # loaded from the bucket
        first.close()
        first = None
        shutil.rmtree(stores[0])  # the replica and its disk are gone; its concepts are not
        shutil.rmtree(stores[1] / "library-cache")
        assert [c.name for c in second.concepts()] == [listed.name]
        again = second.compose(prompt, delta=learner_pb2.COMPOSITION_DELTA_ONE_JOB, delta_job=f"operations/{job}")
        assert again[0].image == composed[0].image
        # a job the surviving replica does not own cannot be deleted through it: NOT_FOUND, the library keeps it
        from google.longrunning import operations_pb2

        with pytest.raises(grpc.RpcError) as e:
            second.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=f"operations/{job}"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(second.concepts()) == 1
    finally:
        for learner in (first, second):
            if learner is not None:
                learner.close()
