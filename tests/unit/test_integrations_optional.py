"""The integrations are optional: without boto3 or httpx installed, ``import treadle``
and the receivers' ``verify_webhook`` work, and building an S3 store or delivering a
webhook says which extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    sys.modules["boto3"] = None   # as if not installed: importing it raises ImportError
    sys.modules["httpx"] = None
    import treadle
    from treadle import S3BlobStore, WebhookEventSink, verify_webhook
    from treadle.adapters.webhook import sign_webhook
    from treadle.kernel.errors import StorageError, WebhookDeliveryError

    headers = sign_webhook("whsec_c2VjcmV0", "m1", 100, b"{}")
    assert verify_webhook(b"{}", headers, "whsec_c2VjcmV0", now=100) == {}
    try:
        S3BlobStore("bucket")
    except StorageError as exc:
        assert "treadle[aws]" in str(exc), exc
    else:
        raise AssertionError("no error without boto3")
    sink = WebhookEventSink("https://hooks.example.com/x", "whsec_c2VjcmV0",
                            resolver=lambda host, port: ["93.184.216.34"])
    from datetime import datetime, timezone
    from treadle.kernel.events import WorkflowCreated
    event = WorkflowCreated(workflow_run_id="r", timestamp=datetime.now(timezone.utc),
                            workflow_id="wf", priority=5)
    try:
        asyncio.run(sink.publish(event))
    except WebhookDeliveryError as exc:
        assert "treadle[webhook]" in str(exc), exc
    else:
        raise AssertionError("no error without httpx")
    print("ok")
    """
)


def test_integrations_import_and_explain_without_their_extras() -> None:
    """With boto3 and httpx hidden, the package imports, verify_webhook works, and the
    S3 store and the webhook sink name the extra to install."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
