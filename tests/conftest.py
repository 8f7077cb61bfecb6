"""Shared fixtures: real servers on loopback (test LLM server, moto S3) and sample shards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class LLMServer:
    """A test LLM server process on loopback, with its stats endpoint."""

    def __init__(self, faults: list[str], latency_ms: float = 0, extra: list[str] = (), log_dir: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "maga_tasks.test_server", "--host", "127.0.0.1", "--port", str(self.port)]
        for fault in faults:
            command += ["--fault", fault]
        if latency_ms:
            command += ["--latency-ms", str(latency_ms)]
        command += list(extra)
        log = open(log_dir / f"llm-{self.port}.log", "wb") if log_dir else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.url}/health", process=self.process)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=5) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/_reset", data=b"", method="POST")
        urllib.request.urlopen(request, timeout=5).read()

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def llm_server_factory(tmp_path):
    servers: list[LLMServer] = []

    def start(*faults: str, latency_ms: float = 0, extra: list[str] = ()) -> LLMServer:
        server = LLMServer(list(faults), latency_ms, extra, tmp_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def llm_server(llm_server_factory) -> LLMServer:
    return llm_server_factory()


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 in server mode: real HTTP on loopback, not an in-process mock."""
    port = free_port()
    binary = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/moto-api/", process=process)
    yield url
    stop_process(process)


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """Credentials and endpoint for boto3 talking to the moto server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MAGA_S3_ENDPOINT_URL", moto_server)
    return moto_server


@pytest.fixture(scope="session")
def sample_articles():
    from maga_tasks.sample_corpus import wikipedia_summaries

    return wikipedia_summaries()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, sample_articles) -> Path:
    """A byte-level BPE tokenizer trained here on sample text, saved like a hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator((a["text"] for a in sample_articles[:2000]), trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out
