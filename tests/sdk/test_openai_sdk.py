"""The official `openai` Python SDK against the running gateway.

The SDK is what users point at a gateway; it must never be surprised. This starts the
simulated provider (`tollgate-provider`) and the gateway (`tollgate serve`) from the
built binaries, on free loopback ports, and drives them with the SDK: plain and streamed
chat (with and without `include_usage`), embeddings, the 429 the SDK raises as
`RateLimitError` with the gateway's `Retry-After`, the 401 it raises as
`AuthenticationError`, and a burst with no client-visible failure.

    python tests/sdk/test_openai_sdk.py --bin target/debug

Every process it starts is stopped at the end; the whole run is bounded in time.
"""

import argparse
import concurrent.futures
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import openai

BIN = "target/debug"
PROVIDER = None
GATEWAY = None
GATEWAY_URL = None
KEY = "sk-sdk-acme"
TIGHT_KEY = "sk-sdk-tight"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port, proc, what):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within 30 s")


def sha(key):
    return hashlib.sha256(key.encode()).hexdigest()


def setUpModule():
    global PROVIDER, GATEWAY, GATEWAY_URL
    provider_port, gateway_port = free_port(), free_port()
    PROVIDER = subprocess.Popen(
        [os.path.join(BIN, "tollgate-provider"), "--listen", f"127.0.0.1:{provider_port}",
         "--rpm", "600", "--burst", "20"],
        stdout=subprocess.DEVNULL,
    )
    wait_for(provider_port, PROVIDER, "tollgate-provider")
    config = f"""
listen: 127.0.0.1:{gateway_port}
models:
  gpt-4o-mini:
    primary: {{ url: "http://127.0.0.1:{provider_port}", headers: {{ authorization: "Bearer sk-provider" }} }}
    retry: {{ max_retries: 3 }}
  text-embedding-3-small:
    primary: {{ url: "http://127.0.0.1:{provider_port}", headers: {{ authorization: "Bearer sk-provider" }} }}
jobs: {{ path: "{os.path.join(tempfile.mkdtemp(prefix="tollgate-sdk-jobs-"), "jobs.redb")}", workers: 4 }}
tenants:
  acme: {{ key_sha256: "{sha(KEY)}" }}
  tight: {{ key_sha256: "{sha(TIGHT_KEY)}", requests: 2/min }}
"""
    path = os.path.join(tempfile.mkdtemp(prefix="tollgate-sdk-"), "gateway.yaml")
    with open(path, "w") as f:
        f.write(config)
    GATEWAY = subprocess.Popen(
        [os.path.join(BIN, "tollgate"), "serve", "--config", path],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "TOLLGATE_LOG": "warn"},
    )
    wait_for(gateway_port, GATEWAY, "tollgate")
    GATEWAY_URL = f"http://127.0.0.1:{gateway_port}/v1"


def tearDownModule():
    for proc in (GATEWAY, PROVIDER):
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def client(key=KEY):
    # No retries in the SDK: what the test sees is what the gateway answered.
    return openai.OpenAI(base_url=GATEWAY_URL, api_key=key, max_retries=0, timeout=30)


MESSAGES = [{"role": "user", "content": "Say hello in a few words."}]


class Sdk(unittest.TestCase):
    def test_plain_chat(self):
        r = client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        self.assertEqual(r.object, "chat.completion")
        self.assertTrue(r.choices[0].message.content)
        self.assertEqual(r.usage.completion_tokens, 16)
        self.assertGreater(r.usage.prompt_tokens, 0)

    def test_streamed_with_usage(self):
        chunks = list(client().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertTrue(text)
        self.assertEqual(chunks[-1].usage.completion_tokens, 16)

    def test_streamed_without_usage_shows_none(self):
        chunks = list(client().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True))
        self.assertTrue(chunks)
        self.assertTrue(all(c.usage is None for c in chunks),
                        "the gateway asks for usage for itself and hides it")
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")

    def test_embeddings(self):
        r = client().embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        self.assertEqual(len(r.data), 2)
        self.assertTrue(r.data[0].embedding)

    def test_models(self):
        ids = sorted(m.id for m in client().models.list())
        self.assertEqual(ids, ["gpt-4o-mini", "text-embedding-3-small"])

    def test_a_tenant_over_its_limit_gets_rate_limit_error_with_retry_after(self):
        c = client(TIGHT_KEY)
        for _ in range(2):
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with self.assertRaises(openai.RateLimitError) as caught:
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        e = caught.exception
        self.assertEqual(e.status_code, 429)
        wait = int(e.response.headers["retry-after"])
        self.assertTrue(1 <= wait <= 30, wait)
        self.assertEqual(e.code, "rate_limit_exceeded")

    def test_a_wrong_key_is_authentication_error(self):
        with self.assertRaises(openai.AuthenticationError) as caught:
            client("sk-not-a-tenant").chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES)
        self.assertEqual(caught.exception.status_code, 401)

    def test_an_unknown_model_is_not_found(self):
        with self.assertRaises(openai.NotFoundError):
            client().chat.completions.create(model="gpt-9", messages=MESSAGES)

    def test_a_batch_round_trip_files_batches_and_the_output_file(self):
        import io
        import json
        c = client()
        lines = [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"batch {i}"}]}})
                 for i in range(5)]
        lines.append("{not json")
        f = c.files.create(file=("input.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
        self.assertEqual(f.purpose, "batch")
        self.assertEqual(c.files.retrieve(f.id).id, f.id)
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata={"job": "sdk-test"})
        self.assertEqual(b.status, "in_progress")
        deadline = time.monotonic() + 60
        while b.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
            time.sleep(0.1)
            b = c.batches.retrieve(b.id)
        self.assertEqual(b.status, "completed")
        self.assertEqual((b.request_counts.total, b.request_counts.completed, b.request_counts.failed), (6, 5, 1))
        out = [json.loads(l) for l in c.files.content(b.output_file_id).text.splitlines()]
        self.assertEqual(sorted(o["custom_id"] for o in out), [f"req-{i}" for i in range(5)])
        self.assertTrue(all(o["response"]["status_code"] == 200 for o in out))
        self.assertTrue(all(o["response"]["body"]["usage"]["completion_tokens"] == 16 for o in out))
        errors = c.files.content(b.error_file_id).text.splitlines()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(b.id, [x.id for x in c.batches.list()])
        self.assertTrue(c.files.delete(f.id).deleted)

    def test_a_burst_past_the_providers_burst_has_no_visible_failure(self):
        # 60 at once against a provider whose bucket holds 20: the gateway learns the
        # quota from the provider's headers and paces the rest; the SDK sees only 200s.
        c = client()

        def one(i):
            r = c.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"burst {i}"}])
            return r.usage.completion_tokens

        with concurrent.futures.ThreadPoolExecutor(max_workers=60) as pool:
            results = list(pool.map(one, range(60), timeout=120))
        self.assertEqual(results, [16] * 60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default=BIN)
    args, rest = parser.parse_known_args()
    BIN = args.bin
    unittest.main(argv=[sys.argv[0], "-v", *rest])
