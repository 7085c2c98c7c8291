"""A local server speaking the S3 protocol (moto's standalone server), started by the tests.

`moto.server` runs as its own process bound to one address (127.0.0.1, or a test namespace's veth
address). Authentication is on: after the setup calls below, every request must be signed by a
user moto knows, and a user's IAM policy decides what it may do, so a permission error is the
server's own answer (AccessDenied), not a simulated one.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.stack_fixtures import free_port, kill_group, wait_until

REGION = "us-east-1"
def _allow(action: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]})


ALLOW_S3, ALLOW_IAM = _allow("s3:*"), _allow("iam:*")
# the calls made before authentication starts: create the user, its key, its two policies
_SETUP_CALLS = 4


@dataclass
class S3StandIn:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def url(self, prefix: str = "artifacts") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def env(self, prefix: str = "artifacts") -> dict[str, str]:
        """What a songpipe process needs to use the bucket (the usual AWS_* variables)."""
        return {"SONGPIPE_ARTIFACT_URL": self.url(prefix), "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def keys(self) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def revoke(self) -> None:
        """Take the user's S3 rights away: its next request is denied by the server."""
        self.client("iam").delete_user_policy(UserName="songpipe", PolicyName="s3")

    def grant(self) -> None:
        self.client("iam").put_user_policy(UserName="songpipe", PolicyName="s3", PolicyDocument=ALLOW_S3)


def _listens(host: str, port: int) -> bool:
    # a bare connect: an HTTP probe could count against the unauthenticated setup calls
    import socket

    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def s3_stand_in(workdir: Path, host: str = "127.0.0.1", argv_prefix: tuple[str, ...] = ()) -> Iterator[S3StandIn]:
    """moto.server on host:free port with one bucket and one user allowed to use it.

    `argv_prefix` runs it elsewhere, e.g. ("ip", "netns", "exec", "A").
    """
    import boto3

    port = free_port()
    endpoint = f"http://{host}:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_SETUP_CALLS)
    log = open(workdir / "moto.log", "ab")
    process = subprocess.Popen([*argv_prefix, sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    log.close()
    try:
        wait_until(lambda: _listens(host, port), 30, f"moto S3 server at {endpoint}")
        setup = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="songpipe")
        key = iam.create_access_key(UserName="songpipe")["AccessKey"]
        iam.put_user_policy(UserName="songpipe", PolicyName="iam", PolicyDocument=ALLOW_IAM)
        iam.put_user_policy(UserName="songpipe", PolicyName="s3", PolicyDocument=ALLOW_S3)
        stand_in = S3StandIn(endpoint, f"songpipe-{uuid.uuid4().hex[:8]}", key["AccessKeyId"],
                             key["SecretAccessKey"], process)
        stand_in.client().create_bucket(Bucket=stand_in.bucket)
        yield stand_in
    finally:
        kill_group(process)
