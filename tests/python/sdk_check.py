"""The official `anthropic` Python SDK against the fusebox proxy (run by tests/sdk.rs).

    sdk_check.py            (steps on stdin, one JSON object a line)

Each step is {"scenario": S, "base_url": URL, "model": M, "feature": F or null}, S one of
  create  messages.create (non-streaming)
  stream  messages.stream (streaming), the text read event by event
  error   messages.create where the server answers with an error

For each step, a client is built as an application would build it:
`anthropic.Anthropic(base_url=...)`, `max_retries` left at its default (2), so that any retry
the SDK makes on top of the proxy shows. Every HTTP request the SDK sends is counted by an
httpx event hook. Prints one JSON object a step on stdout (flushed): what the SDK returned (or
raised), the proxy's x-fusebox-* headers, and the number of requests sent. One process runs
every step (importing the SDK is the slow part). Exits 0 at the end of its input, whatever the
outcomes (the Rust test judges); 2 on a usage error or an unknown scenario.
"""

import json
import sys

import anthropic

API_KEY = "sk-ant-sdk-test-key-0123456789"


def main() -> int:
    if len(sys.argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        step = json.loads(line)
        out = run(step["scenario"], step["base_url"], step["model"], step.get("feature"))
        if out is None:
            print(f"unknown scenario {step['scenario']!r}", file=sys.stderr)
            return 2
        print(json.dumps(out), flush=True)
    return 0


def run(scenario, base_url, model, feature):
    sent = []
    auth = set()

    def count(request):
        sent.append(f"{request.method} {request.url.path}")
        # How this SDK version sends the key: x-api-key, or authorization: Bearer (newer ones).
        for name in ("x-api-key", "authorization"):
            if API_KEY in request.headers.get(name, ""):
                auth.add(name)

    headers = {"x-fusebox-feature": feature} if feature else None
    client = anthropic.Anthropic(
        base_url=base_url,
        api_key=API_KEY,
        default_headers=headers,
        http_client=anthropic.DefaultHttpxClient(event_hooks={"request": [count]}),
    )
    assert client.max_retries == 2, client.max_retries

    out = {
        "scenario": scenario,
        "sdk_version": anthropic.__version__,
        "max_retries": client.max_retries,
    }
    messages = [{"role": "user", "content": "Say hello."}]

    if scenario == "create":
        raw = client.messages.with_raw_response.create(
            model=model, max_tokens=64, messages=messages
        )
        message = raw.parse()
        out.update(
            ok=True,
            model=message.model,
            text="".join(b.text for b in message.content if b.type == "text"),
            stop_reason=message.stop_reason,
            status=raw.status_code,
            retries_taken=getattr(raw, "retries_taken", None),
            headers=fusebox_headers(raw.headers),
        )
    elif scenario == "stream":
        with client.messages.stream(
            model=model, max_tokens=64, messages=messages
        ) as stream:
            chunks = list(stream.text_stream)
            message = stream.get_final_message()
            response = stream.response
        out.update(
            ok=True,
            model=message.model,
            text="".join(chunks),
            chunks=len(chunks),
            stop_reason=message.stop_reason,
            status=response.status_code,
            headers=fusebox_headers(response.headers),
        )
    elif scenario == "error":
        try:
            client.messages.create(model=model, max_tokens=64, messages=messages)
            out.update(ok=True)
        except anthropic.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else None
            out.update(
                ok=False,
                exception=type(e).__name__,
                status=e.status_code,
                error_type=(body or {}).get("error", {}).get("type")
                if isinstance((body or {}).get("error"), dict)
                else None,
                headers=fusebox_headers(e.response.headers),
            )
    else:
        return None

    out["auth"] = ",".join(sorted(auth))
    out["requests_sent"] = len(sent)
    out["requests"] = sent
    return out


def fusebox_headers(headers) -> dict:
    """The proxy's own response headers, and the ones that steer an SDK's retries."""
    keep = ("x-should-retry", "retry-after", "retry-after-ms", "request-id")
    return {
        k.lower(): v
        for k, v in headers.items()
        if k.lower().startswith("x-fusebox-") or k.lower() in keep
    }


if __name__ == "__main__":
    sys.exit(main())
