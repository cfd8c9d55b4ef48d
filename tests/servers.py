"""Real servers on loopback for the cloud-delivery tests: Orthanc with DICOMweb, moto's S3, Azurite.

Each starts on free ports with its data in the test's temp folder, can be stopped and
started again on the same port (the "server down, then up" tests), and is skipped
with a clear reason when its program is not installed (CI installs all three).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, listening, wait_for

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_PLUGINS = "/usr/share/orthanc/plugins"
# Azurite's documented development account (public, in every Azure Storage emulator's docs).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Server:
    """A child process on a fixed loopback port: start, stop, start again."""

    name = "server"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        return listening(self.port)

    def start(self) -> Server:
        with open(self.log, "ab") as handle:
            self.proc = subprocess.Popen(self.command(), stdout=handle, stderr=handle, cwd=self.folder, env=self.env())
        ok = wait_for(lambda: self.proc.poll() is not None or self.ready(), 60, 0.2)
        assert ok and self.proc.poll() is None, f"{self.name} did not start:\n{self.log.read_text()[-3000:]}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        wait_for(lambda: not listening(self.port), 10)


class Orthanc(Server):
    """Orthanc with its DICOMweb plugin and HTTP basic auth on."""

    name = "orthanc"
    user, password = "telenode", "stow-secret-1"

    def __init__(self, folder: Path) -> None:
        if not os.access(ORTHANC, os.X_OK) or not any(Path(ORTHANC_PLUGINS).glob("*DicomWeb*")):
            pytest.skip("Orthanc with the DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
        super().__init__(folder)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "telenode-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.port, "DicomPort": free_port(), "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {self.user: self.password},
            "Plugins": [ORTHANC_PLUGINS], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpTimeout": 60, "StableAge": 1, "ConcurrentJobs": 1,
        }))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def command(self) -> list[str]:
        return [ORTHANC, str(self.config)]

    def ready(self) -> bool:
        return listening(self.port) and self._get("/system") is not None

    def _get(self, path: str) -> Any:
        import requests

        try:
            response = requests.get(f"http://127.0.0.1:{self.port}{path}", auth=(self.user, self.password), timeout=10)
        except requests.RequestException:
            return None
        return response.json() if response.ok else None

    def instances(self) -> list[str]:
        """SOP Instance UIDs stored, each once (Orthanc keys instances by their UIDs)."""
        ids = self._get("/instances") or []
        return [self._get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in ids]

    def tags(self, sop_uid: str) -> dict[str, Any]:
        found = [i for i in self._get("/instances") or []
                 if self._get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] == sop_uid]
        return self._get(f"/instances/{found[0]}/simplified-tags") if found else {}

    def file(self, orthanc_id: str) -> bytes:
        import requests

        return requests.get(f"http://127.0.0.1:{self.port}/instances/{orthanc_id}/file",
                            auth=(self.user, self.password), timeout=30).content


class MotoS3(Server):
    """moto's standalone server (an S3 API on loopback); its state lives as long as the process.

    With `auth`, requests must be signed by a key of moto's IAM: `start` creates a user allowed s3:*
    (the first requests, before auth applies) and keeps its key in `key_id` / `secret`."""

    name = "moto"

    def __init__(self, folder: Path, auth: bool = False) -> None:
        pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
        super().__init__(folder)
        self.auth = auth
        self.key_id, self.secret = "testing", "testing"

    def start(self) -> "MotoS3":
        super().start()
        self.key_id, self.secret = "testing", "testing"
        if self.auth:
            import boto3

            iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="setup",
                               aws_secret_access_key="setup")
            iam.create_user(UserName="telenode")
            key = iam.create_access_key(UserName="telenode")["AccessKey"]
            iam.put_user_policy(UserName="telenode", PolicyName="s3", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
            self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-c", MOTO_KEEPING_UNDERSCORES, "-H", "127.0.0.1", "-p", str(self.port)]

    def env(self) -> dict[str, str]:
        return {**os.environ, **credentials(), **({"INITIAL_NO_AUTH_ACTION_COUNT": "3"} if self.auth else {})}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret)


#: `python -m moto.server`, except that werkzeug's dev server no longer drops request headers with an
#: underscore (x-amz-meta-batch_id, which AWS keeps): WSGI cannot tell them from dashes, so moto stores
#: such a key as batch-id; the tests accept that spelling from moto only.
MOTO_KEEPING_UNDERSCORES = """
import sys
import werkzeug.serving as serving
original = serving.WSGIRequestHandler.make_environ
def make_environ(self):
    environ = original(self)
    for key, value in self.headers.items():
        if "_" in key:
            environ.setdefault("HTTP_" + key.upper().replace("-", "_"), value)
    return environ
serving.WSGIRequestHandler.make_environ = make_environ
from moto.server import main
main(sys.argv[1:])
"""


def credentials(key_id: str = "testing", secret: str = "testing") -> dict[str, str]:
    """boto3's standard chain, environment part (the only place the node takes S3 credentials from)."""
    return {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}


class Azurite(Server):
    """Azurite's Blob service with its well-known development account."""

    name = "azurite"

    def __init__(self, folder: Path) -> None:
        if shutil.which("azurite-blob") is None:
            pytest.skip("Azurite is not installed (npm install -g azurite)")
        super().__init__(folder)

    def command(self) -> list[str]:
        return ["azurite-blob", "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location",
                str(self.folder / "data"), "--skipApiVersionCheck", "--silent"]

    def connection_string(self, key: str = AZURITE_KEY) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
                f"BlobEndpoint=http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT};")

    def container(self, name: str) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string()).get_container_client(name)


def cloud_node(make_node: Any, destination: str, stable_seconds: float = 1.0) -> Any:
    """A conftest `Node` (real `telenode serve`) whose only destination is the given TOML table."""
    node = make_node([])
    fast = "retry_delay = 0.3\nmax_retry_delay = 1.0\nconnect_timeout = 3\nnetwork_timeout = 20\n"
    node.config.write_text(node.config.read_text() + destination.strip() + "\n" + fast
                           + f"\n[studies]\nstable_seconds = {stable_seconds}\n")
    return node
