"""The great_expectations gates on S3: a shard's Data Docs uploaded to a moto server (the
gates on local files: tests/unit/quality/test_quality.py)."""

from __future__ import annotations

import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.quality import load_committed, validate_output
from maga_tasks.recipe import load_recipe
from tests.support.shards import write_committed_shard

RECIPE = load_recipe()
RID = RECIPE.recipe_id


@pytest.mark.integration
def test_data_docs_are_uploaded_for_an_s3_output_root(tmp_path, s3_env):
    import boto3

    from maga_tasks.data.storage import storage_for

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="corpus")
    local = tmp_path / "local"
    write_committed_shard(local, RECIPE, "part-0000", defects=("duplicate_ids",))
    root = "s3://corpus/expanded"
    remote = shard_paths(root, RID, "part-0000")
    storage = storage_for(root)
    storage.put_file(remote.data, shard_paths(str(local), RID, "part-0000").data)
    storage.put_file(remote.rejected, shard_paths(str(local), RID, "part-0000").rejected)

    report = validate_output(load_committed(remote), RECIPE)
    assert not report.success
    assert report.docs_uri == f"{root}/{RID}/quality/part-0000/output/index.html"
    keys = storage.list(f"{root}/{RID}/quality/part-0000/output")
    assert report.docs_uri in keys
    pages = [k for k in keys if "/validations/" in k and k.endswith(".html")]
    assert pages and any(b"unique_ids:" in storage.read_bytes(k) for k in pages)
    assert not any("/static/fonts/" in k for k in keys)
