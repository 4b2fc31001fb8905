"""Fake OpenAI Batch and Anthropic Message Batches endpoints for the SDKs' own HTTP
clients (an ``httpx2.MockTransport``: the SDKs installed by the ``ai`` extra use httpx2).

The bodies are the shapes of the providers' public API references: the OpenAI ``File``
and ``Batch`` objects and the batch output file's JSONL lines
(platform.openai.com/docs/api-reference/batch), and the Anthropic ``message_batch``
object and its results JSONL (docs.anthropic.com/en/api/creating-message-batches,
/retrieving-message-batch-results). A batch reports itself running for
``polls_until_done`` retrievals, then finished; each prompt is answered with
``"answer to: <prompt>"`` and fixed token counts; the results come back in reverse order
(the providers do not promise order), and the item at ``fail_index`` errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx2

INPUT_TOKENS = 1000
OUTPUT_TOKENS = 500


@dataclass
class FakeOpenAI:
    polls_until_done: int = 1
    fail_index: int | None = None
    final_status: str = "completed"
    answered: int | None = None
    """How many prompts the output file answers (``None``: all), for a batch that
    expired or was cancelled part way."""
    busy_uploads: int = 0
    """File uploads answered 429 (Retry-After: 300) before one is accepted."""
    requests: list[tuple[str, str]] = field(default_factory=list)
    uploaded: list[dict[str, Any]] = field(default_factory=list)
    retrievals: int = 0
    batches_created: int = 0

    def client(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            api_key="sk-test",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self.handle)),
        )

    def _batch(self, status: str) -> dict[str, Any]:
        done = status in ("completed", "expired", "cancelled")
        return {
            "id": "batch_abc123",
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": None,
            "input_file_id": "file-abc123",
            "completion_window": "24h",
            "status": status,
            "output_file_id": "file-cvaTdG" if done else None,
            "error_file_id": None,
            "created_at": 1711471533,
            "in_progress_at": 1711471538,
            "expires_at": 1711557933,
            "finalizing_at": 1711493133 if done else None,
            "completed_at": 1711493163 if done else None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(self.uploaded), "completed": 0, "failed": 0},
            "metadata": {"customer_id": "user_123456789"},
        }

    def _output(self) -> str:
        lines = []
        for i, line in enumerate(self.uploaded[: self.answered]):
            prompt = line["body"]["messages"][-1]["content"]
            if i == self.fail_index:
                lines.append(
                    {
                        "id": f"batch_req_{i}",
                        "custom_id": line["custom_id"],
                        "response": {
                            "status_code": 400,
                            "request_id": f"req_{i}",
                            "body": {"error": {"message": "bad request", "type": "invalid"}},
                        },
                        "error": None,
                    }
                )
                continue
            lines.append(
                {
                    "id": f"batch_req_{i}",
                    "custom_id": line["custom_id"],
                    "response": {
                        "status_code": 200,
                        "request_id": f"req_{i}",
                        "body": {
                            "id": f"chatcmpl-{i}",
                            "object": "chat.completion",
                            "created": 1711652795,
                            "model": line["body"]["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {
                                        "role": "assistant",
                                        "content": f"answer to: {prompt}",
                                    },
                                    "logprobs": None,
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {
                                "prompt_tokens": INPUT_TOKENS,
                                "completion_tokens": OUTPUT_TOKENS,
                                "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
                            },
                            "system_fingerprint": "fp_123",
                        },
                    },
                    "error": None,
                }
            )
        return "\n".join(json.dumps(line) for line in reversed(lines)) + "\n"

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if request.method == "POST" and path == "/v1/files" and self.busy_uploads:
            self.busy_uploads -= 1
            return httpx2.Response(
                429,
                json={"error": {"message": "Rate limit reached", "type": "requests"}},
                headers={"retry-after": "300"},
            )
        if request.method == "POST" and path == "/v1/files":
            body = request.read()
            start = body.index(b'{"custom_id"')
            end = body.rindex(b"}") + 1
            self.uploaded = [json.loads(x) for x in body[start:end].decode().splitlines() if x]
            return httpx2.Response(
                200,
                json={
                    "id": "file-abc123",
                    "object": "file",
                    "bytes": len(body),
                    "created_at": 1677610602,
                    "filename": "batch.jsonl",
                    "purpose": "batch",
                    "status": "processed",
                    "expires_at": None,
                    "status_details": None,
                },
            )
        if request.method == "POST" and path == "/v1/batches":
            self.batches_created += 1
            return httpx2.Response(200, json=self._batch("validating"))
        if request.method == "GET" and path == "/v1/batches/batch_abc123":
            self.retrievals += 1
            status = self.final_status if self.retrievals > self.polls_until_done else "in_progress"
            return httpx2.Response(200, json=self._batch(status))
        if request.method == "GET" and path == "/v1/files/file-cvaTdG/content":
            return httpx2.Response(200, content=self._output().encode())
        return httpx2.Response(404, json={"error": {"message": f"no route {path}"}})


@dataclass
class FakeAnthropic:
    polls_until_done: int = 1
    fail_index: int | None = None
    requests: list[tuple[str, str]] = field(default_factory=list)
    submitted: list[dict[str, Any]] = field(default_factory=list)
    retrievals: int = 0
    batches_created: int = 0

    def client(self) -> Any:
        from anthropic import AsyncAnthropic

        return AsyncAnthropic(
            api_key="sk-ant-test",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self.handle)),
        )

    def _batch(self, ended: bool) -> dict[str, Any]:
        n = len(self.submitted)
        return {
            "id": "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF",
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {
                "processing": 0 if ended else n,
                "succeeded": n if ended else 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            },
            "ended_at": "2024-08-20T18:37:24.100435Z" if ended else None,
            "created_at": "2024-08-20T18:37:24.100435Z",
            "expires_at": "2024-08-21T18:37:24.100435Z",
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": (
                "https://api.anthropic.com/v1/messages/batches/"
                "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF/results"
                if ended
                else None
            ),
        }

    def _results(self) -> str:
        lines = []
        for i, request in enumerate(self.submitted):
            params = request["params"]
            if i == self.fail_index:
                lines.append(
                    {
                        "custom_id": request["custom_id"],
                        "result": {
                            "type": "errored",
                            "error": {
                                "type": "error",
                                "error": {"type": "invalid_request_error", "message": "bad"},
                            },
                        },
                    }
                )
                continue
            lines.append(
                {
                    "custom_id": request["custom_id"],
                    "result": {
                        "type": "succeeded",
                        "message": {
                            "id": f"msg_{i}",
                            "type": "message",
                            "role": "assistant",
                            "model": params["model"],
                            "content": [
                                {
                                    "type": "text",
                                    "text": f"answer to: {params['messages'][0]['content']}",
                                }
                            ],
                            "stop_reason": "end_turn",
                            "stop_sequence": None,
                            "usage": {
                                "input_tokens": INPUT_TOKENS,
                                "output_tokens": OUTPUT_TOKENS,
                            },
                        },
                    },
                }
            )
        return "\n".join(json.dumps(line) for line in reversed(lines)) + "\n"

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        base = "/v1/messages/batches"
        batch_id = "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF"
        if request.method == "POST" and path == base:
            self.batches_created += 1
            self.submitted = json.loads(request.read())["requests"]
            return httpx2.Response(200, json=self._batch(False))
        if request.method == "GET" and path == f"{base}/{batch_id}":
            self.retrievals += 1
            return httpx2.Response(200, json=self._batch(self.retrievals > self.polls_until_done))
        if request.method == "GET" and path == f"{base}/{batch_id}/results":
            return httpx2.Response(
                200,
                content=self._results().encode(),
                headers={"content-type": "application/binary"},
            )
        return httpx2.Response(404, json={"type": "error", "error": {"message": path}})
