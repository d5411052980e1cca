//! The Anthropic client against the fake upstream (a real HTTP server on 127.0.0.1): every
//! status class, headers, SSE, errors after the 200, dropped connections, garbage, truncation,
//! huge headers.

use std::time::Duration;

use fusebox::anthropic::{ApiKey, Client, EventKind, MessagesRequest};
use fusebox::classify::{Class, Classification, Reason};
use fusebox::mock::{MockUpstream, Plan, Reply};
use fusebox::{CallOutcome, UpstreamError, UpstreamErrorKind};

const KEY: &str = "sk-ant-test-0123456789-secret";

async fn mock() -> MockUpstream {
    MockUpstream::builder().start().await.expect("mock binds")
}

fn client(mock: &MockUpstream) -> Client {
    Client::builder()
        .base_url(mock.url())
        .api_key(ApiKey::new(KEY).expect("key"))
        .beta("prompt-caching-2024-07-31")
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn ask(model: &str, text: &str) -> MessagesRequest {
    MessagesRequest::user_text(model, 64, text)
}

async fn fail(mock: &MockUpstream, model: &str, reply: Reply) -> UpstreamError {
    mock.set(model, Plan::always(reply));
    match client(mock).send(&ask(model, "hello")).await {
        Ok(r) => panic!("expected an error, got {r:?}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn an_answer_echoes_the_request_and_carries_its_headers() {
    let mock = mock().await;
    let req = ask("claude-a", "what is two plus two")
        .with("metadata", serde_json::json!({"user_id": "u1"}));
    let reply = client(&mock).send(&req).await.expect("answer");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.message.model, "claude-a");
    assert_eq!(reply.message.text(), "claude-a says: what is two plus two");
    assert_eq!(reply.message.stop_reason.as_deref(), Some("end_turn"));
    assert!(reply.message.usage.output_tokens > 0);
    assert!(reply
        .headers
        .request_id
        .as_deref()
        .is_some_and(|id| id.starts_with("req_")));
    let b = client(&mock)
        .send(&ask("claude-b", "other"))
        .await
        .expect("answer");
    assert_eq!(b.message.text(), "claude-b says: other");
    assert_eq!(
        (mock.requests("claude-a"), mock.requests("claude-b")),
        (1, 1)
    );
    let seen = mock.seen();
    assert_eq!(seen[0].api_key.as_deref(), Some(KEY));
    assert_eq!(seen[0].version.as_deref(), Some("2023-06-01"));
    assert_eq!(seen[0].beta.as_deref(), Some("prompt-caching-2024-07-31"));
    assert!(!seen[0].stream);
}

#[tokio::test]
async fn every_status_class_is_classified() {
    let mock = mock().await;
    let retryable = |reason| Classification::retryable(reason, None);
    let cases = [
        (400, Classification::final_(Reason::BadRequest)),
        (401, Classification::final_(Reason::Credentials)),
        (402, Classification::final_(Reason::Account)),
        (403, Classification::final_(Reason::Permission)),
        // The mock answers a 404 as the API does for a model it does not serve.
        (
            404,
            Classification::overloaded(Reason::ModelNotFound, None)
                .with_health(CallOutcome::Ignored),
        ),
        (408, retryable(Reason::UpstreamTimeout)),
        (
            409,
            retryable(Reason::Conflict).with_health(CallOutcome::Ignored),
        ),
        (
            413,
            Classification::new(Class::ContextTooLarge, Reason::ContextTooLarge),
        ),
        (429, Classification::overloaded(Reason::RateLimited, None)),
        (500, retryable(Reason::ServerError)),
        (502, retryable(Reason::ServerError)),
        (503, retryable(Reason::ServerError)),
        (504, retryable(Reason::UpstreamTimeout)),
        (529, Classification::overloaded(Reason::Overloaded, None)),
    ];
    for (status, want) in cases {
        let e = fail(&mock, "m", Reply::status(status)).await;
        assert_eq!(e.kind, UpstreamErrorKind::Status, "{status}");
        assert_eq!(e.status, Some(status));
        assert!(e.error_type.is_some(), "{status}: body read");
        assert!(e.request_id.is_some(), "{status}: request id read");
        assert_eq!(e.classification, want, "{status}: {e}");
    }
    assert_eq!(mock.requests("m"), cases.len() as u64);
}

#[tokio::test]
async fn retry_after_headers_reach_the_classification() {
    let mock = mock().await;
    let e = fail(&mock, "m", Reply::rate_limited(7)).await;
    assert_eq!(
        e.classification.class.retry_after(),
        Some(Duration::from_secs(7))
    );
    let e = fail(
        &mock,
        "m",
        Reply::overloaded().retry_after_ms("1500").retry_after("9"),
    )
    .await;
    assert_eq!(e.retry_after, Some(Duration::from_millis(1500)));
    let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
    let e = fail(&mock, "m", Reply::rate_limited(0).retry_after(later)).await;
    let d = e.retry_after.expect("an HTTP date is read");
    assert!(
        d > Duration::from_secs(100) && d <= Duration::from_secs(120),
        "{d:?}"
    );
    for bad in ["-1", "abc", ""] {
        let e = fail(&mock, "m", Reply::status(429).retry_after(bad)).await;
        assert_eq!(e.retry_after, None, "{bad:?}");
        assert_eq!(
            e.classification.class,
            Class::Overloaded { retry_after: None },
            "{bad:?}"
        );
    }
    for (value, want) in [
        ("1e12", fusebox::anthropic::RETRY_AFTER_CEILING),
        ("Wed, 21 Oct 2015 07:28:00 GMT", Duration::ZERO),
    ] {
        let e = fail(&mock, "m", Reply::status(529).retry_after(value)).await;
        assert_eq!(e.retry_after, Some(want), "{value:?}");
    }
}

#[tokio::test]
async fn the_spend_cap_and_context_errors_route_as_documented() {
    let mock = mock().await;
    let e = fail(&mock, "m", Reply::spend_cap()).await;
    assert_eq!(
        e.error_code.as_deref(),
        Some("enforced_spend_limit_reached")
    );
    assert_eq!(e.classification, Classification::final_(Reason::Account));
    assert_eq!(e.classification.health, CallOutcome::Ignored);
    let e = fail(&mock, "m", Reply::prompt_too_long()).await;
    assert_eq!(e.classification.class, Class::ContextTooLarge);
    assert_eq!(e.classification.health, CallOutcome::Ignored);
    // A proxy that already retried says "not again here": the next target at once.
    let e = fail(&mock, "m", Reply::status(503).should_retry(false)).await;
    assert_eq!(
        e.classification.class,
        Class::Overloaded { retry_after: None }
    );
    assert_eq!(e.classification.health, CallOutcome::Failure);
}

#[tokio::test]
async fn a_stream_arrives_event_by_event() {
    let mock = mock().await;
    let events = client(&mock)
        .stream(&ask("claude-s", "stream me"))
        .await
        .expect("200")
        .collect()
        .await
        .expect("whole stream");
    let kinds: Vec<_> = events.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            EventKind::MessageStart,
            EventKind::ContentBlockStart,
            EventKind::Ping,
            EventKind::ContentBlockDelta,
            EventKind::ContentBlockDelta,
            EventKind::ContentBlockStop,
            EventKind::MessageDelta,
            EventKind::MessageStop,
        ]
    );
    let text: String = events.iter().filter_map(|e| e.text_delta()).collect();
    assert_eq!(text, "claude-s says: stream me");
    assert_eq!(
        events[0].message().map(|m| m.model),
        Some("claude-s".into())
    );
    assert!(mock.seen()[0].stream, "stream: true was sent");
}

#[tokio::test]
async fn an_error_event_after_the_200_is_a_classified_error() {
    let mock = mock().await;
    mock.set(
        "m",
        Plan::always(Reply::error_after_start("overloaded_error")),
    );
    let mut s = client(&mock)
        .stream(&ask("m", "hi"))
        .await
        .expect("the 200");
    assert_eq!(s.status, 200);
    let first = s.next().await.expect("an event").expect("message_start");
    assert_eq!(first.kind, EventKind::MessageStart);
    let second = s.next().await.expect("an event").expect("ping");
    assert_eq!(second.kind, EventKind::Ping);
    let e = s
        .next()
        .await
        .expect("the error")
        .expect_err("an error event");
    assert_eq!(e.kind, UpstreamErrorKind::StreamError);
    assert_eq!(e.error_type.as_deref(), Some("overloaded_error"));
    assert_eq!(
        e.classification,
        Classification::overloaded(Reason::Overloaded, None)
    );
    assert!(s.next().await.is_none(), "the stream ends after its error");
    // Without a stream the same failure comes as its status.
    let e = fail(&mock, "m", Reply::error_after_start("overloaded_error")).await;
    assert_eq!((e.kind, e.status), (UpstreamErrorKind::Status, Some(529)));
}

#[tokio::test]
async fn a_dropped_connection_is_interrupted_and_retryable() {
    let mock = mock().await;
    let e = fail(&mock, "m", Reply::DropMidBody).await;
    assert_eq!(e.kind, UpstreamErrorKind::Interrupted, "{e}");
    assert_eq!(
        e.classification,
        Classification::retryable(Reason::Interrupted, None)
    );
    let result = client(&mock)
        .stream(&ask("m", "hi"))
        .await
        .expect("the 200")
        .collect()
        .await;
    let e = result.expect_err("cut mid-stream");
    assert_eq!(e.kind, UpstreamErrorKind::Interrupted, "{e}");
    assert!(e.classification.health == CallOutcome::Failure);
}

/// A plain answer larger than 64 MiB is refused as an invalid response instead of being
/// buffered whole (seen before, through the proxy: a 300 MB answer grew it by 300 MB a
/// request).
#[tokio::test]
async fn an_oversized_answer_is_an_invalid_response_not_buffered() {
    let mock = mock().await;
    let huge = format!(
        "{{\"type\":\"message\",\"pad\":\"{}\"}}",
        "x".repeat(65 * 1024 * 1024)
    );
    let e = fail(
        &mock,
        "m",
        Reply::Raw {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: huge,
        },
    )
    .await;
    assert_eq!(e.kind, UpstreamErrorKind::InvalidResponse, "{e}");
    assert!(e.message.contains("larger than"), "{e}");
}

#[tokio::test]
async fn garbage_and_truncated_bodies_are_classified() {
    let mock = mock().await;
    let e = fail(&mock, "m", Reply::Garbage).await;
    assert_eq!(e.kind, UpstreamErrorKind::InvalidResponse);
    assert_eq!(
        e.classification,
        Classification::retryable(Reason::InvalidResponse, None)
    );
    let e = fail(&mock, "m", Reply::Truncated).await;
    assert_eq!(e.kind, UpstreamErrorKind::InvalidResponse, "{e}");
    mock.set("m", Plan::always(Reply::Garbage));
    let stream = client(&mock).stream(&ask("m", "x")).await.expect("200");
    let e = stream.collect().await.expect_err("garbage event");
    assert_eq!(e.kind, UpstreamErrorKind::InvalidResponse, "{e}");
    mock.set("m", Plan::always(Reply::Truncated));
    let e = client(&mock)
        .stream(&ask("m", "x"))
        .await
        .expect("200")
        .collect()
        .await
        .expect_err("no message_stop");
    assert_eq!(e.kind, UpstreamErrorKind::Interrupted, "{e}");
    assert_eq!(
        e.classification,
        Classification::retryable(Reason::Interrupted, None)
    );
    // An error status whose body is not JSON (a load balancer's HTML page).
    let e = fail(
        &mock,
        "m",
        Reply::Raw {
            status: 502,
            headers: vec![],
            body: "<html>Bad Gateway</html>".into(),
        },
    )
    .await;
    assert_eq!(
        (e.kind, e.status, e.error_type.as_deref()),
        (UpstreamErrorKind::Status, Some(502), None)
    );
    assert!(e.message.contains("Bad Gateway"), "{e}");
    assert_eq!(
        e.classification,
        Classification::retryable(Reason::ServerError, None)
    );
}

#[tokio::test]
async fn huge_headers_never_panic() {
    let mock = mock().await;
    let big = "9".repeat(20_000);
    let e = fail(
        &mock,
        "m",
        Reply::Raw {
            status: 429,
            headers: vec![
                ("retry-after".into(), big.clone()),
                ("request-id".into(), format!("req_{big}")),
                ("anthropic-ratelimit-tokens-limit".into(), big.clone()),
                ("x-filler".into(), "x".repeat(60_000)),
            ],
            body: "{}".into(),
        },
    )
    .await;
    assert_eq!(e.retry_after, Some(fusebox::anthropic::RETRY_AFTER_CEILING));
    assert_eq!(e.request_id.as_ref().map(String::len), Some(256));
    assert!(e.classification.health == CallOutcome::Failure);
    // Past what the HTTP client accepts at all: a connection failure, not a panic.
    let e = fail(
        &mock,
        "m",
        Reply::Raw {
            status: 200,
            headers: vec![("x-filler".into(), "x".repeat(2_000_000))],
            body: "{}".into(),
        },
    )
    .await;
    assert!(e.classification.health == CallOutcome::Failure, "{e}");
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_retryable() {
    let mock = mock().await;
    mock.set("m", Plan::always(Reply::Hang));
    let c = Client::builder()
        .base_url(mock.url())
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let e = c.send(&ask("m", "hi")).await.expect_err("hangs");
    assert_eq!(e.kind, UpstreamErrorKind::Timeout);
    assert_eq!(
        e.classification,
        Classification::retryable(Reason::Timeout, None)
    );
    let e = c.stream(&ask("m", "hi")).await.expect_err("hangs");
    assert_eq!(e.kind, UpstreamErrorKind::Timeout);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let c = Client::builder()
        .base_url(format!("http://{addr}"))
        .build()
        .expect("client");
    let e = c.send(&ask("m", "hi")).await.expect_err("refused");
    assert_eq!(e.kind, UpstreamErrorKind::Connect, "{e}");
    assert_eq!(
        e.classification,
        Classification::retryable(Reason::Connect, None)
    );
}

#[tokio::test]
async fn the_failure_rate_is_seeded_and_counts_what_reached_the_upstream() {
    async fn run(seed: u64) -> Vec<bool> {
        let mock = MockUpstream::builder()
            .model("flaky", Plan::answer().failing(0.5, Reply::status(503)))
            .seed(seed)
            .start()
            .await
            .expect("mock");
        let c = client(&mock);
        let mut out = Vec::new();
        for i in 0..40 {
            out.push(c.send(&ask("flaky", &format!("q{i}"))).await.is_ok());
        }
        assert_eq!(mock.requests("flaky"), 40);
        assert_eq!(mock.total_requests(), 40);
        out
    }
    let a = run(7).await;
    assert_eq!(a, run(7).await, "same seed, same failures");
    let ok = a.iter().filter(|x| **x).count();
    assert!(
        (5..=35).contains(&ok),
        "about half fail: {ok} of 40 answered"
    );
}

#[tokio::test]
async fn queued_replies_come_first_and_plans_change_at_run_time() {
    let mock = mock().await;
    mock.push("m", [Reply::overloaded(), Reply::status(500)]);
    let c = client(&mock);
    assert_eq!(
        c.send(&ask("m", "1")).await.expect_err("529").status,
        Some(529)
    );
    assert_eq!(
        c.send(&ask("m", "2")).await.expect_err("500").status,
        Some(500)
    );
    assert!(c.send(&ask("m", "3")).await.is_ok());
    mock.set("m", Plan::always(Reply::status(401)));
    assert_eq!(
        c.send(&ask("m", "4")).await.expect_err("401").status,
        Some(401)
    );
    assert_eq!(mock.requests("m"), 4);
}

#[tokio::test]
async fn the_api_key_never_shows_in_debug_or_errors() {
    let mock = mock().await;
    let c = client(&mock);
    assert!(!format!("{c:?}").contains(KEY));
    let e = fail(&mock, "m", Reply::status(401)).await;
    assert!(!format!("{e} {e:?}").contains(KEY));
    let bad = Client::builder()
        .base_url("not a url")
        .build()
        .expect_err("bad url");
    assert!(bad.to_string().contains("base_url"), "{bad}");
    assert!(ApiKey::new("bad\nkey").is_err());
}

#[tokio::test]
async fn a_stream_that_stalls_times_out_between_chunks() {
    let mock = mock().await;
    mock.set("m", Plan::always(Reply::StallMidStream));
    let c = Client::builder()
        .base_url(mock.url())
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let mut s = c.stream(&ask("m", "hi")).await.expect("the 200");
    let first = s.next().await.expect("an event").expect("message_start");
    assert_eq!(first.kind, EventKind::MessageStart);
    let e = s.next().await.expect("the stall").expect_err("a timeout");
    assert_eq!(e.kind, UpstreamErrorKind::Timeout, "{e}");
    assert_eq!(
        e.classification,
        Classification::retryable(Reason::Timeout, None)
    );
    assert!(s.next().await.is_none());
}

#[tokio::test]
async fn latency_longer_than_the_attempt_timeout_is_a_timeout() {
    let mock = MockUpstream::builder()
        .model("slow", Plan::answer().latency(Duration::from_secs(30)))
        .start()
        .await
        .expect("mock");
    let c = Client::builder()
        .base_url(mock.url())
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let e = c.send(&ask("slow", "hi")).await.expect_err("too slow");
    assert_eq!(e.kind, UpstreamErrorKind::Timeout);
    assert_eq!(mock.requests("slow"), 1, "it reached the upstream");
}

#[tokio::test]
async fn rate_limit_headers_of_an_answer_are_parsed() {
    let mock = mock().await;
    let body = serde_json::json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1}
    });
    let headers = [
        ("request-id", "req_abc"),
        ("anthropic-ratelimit-requests-limit", "1000"),
        ("anthropic-ratelimit-requests-remaining", "999"),
        ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:30Z"),
        ("anthropic-ratelimit-tokens-limit", "80000"),
        ("anthropic-ratelimit-input-tokens-remaining", "40000"),
        ("anthropic-ratelimit-output-tokens-reset", "not a date"),
    ];
    mock.set(
        "m",
        Plan::always(Reply::Raw {
            status: 200,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
        }),
    );
    let r = client(&mock).send(&ask("m", "x")).await.expect("answer");
    let h = &r.headers;
    assert_eq!(h.request_id.as_deref(), Some("req_abc"));
    assert_eq!(h.rate_limits.requests.limit, Some(1000));
    assert_eq!(h.rate_limits.requests.remaining, Some(999));
    assert_eq!(
        h.rate_limits.requests.reset,
        Some(std::time::UNIX_EPOCH + Duration::from_secs(1_767_225_630))
    );
    assert_eq!(h.rate_limits.tokens.limit, Some(80000));
    assert_eq!(h.rate_limits.input_tokens.remaining, Some(40000));
    assert_eq!(h.rate_limits.output_tokens.reset, None);
    assert_eq!(h.problems.len(), 1, "{:?}", h.problems);
    assert_eq!(
        h.problems[0].header,
        "anthropic-ratelimit-output-tokens-reset"
    );
}

#[tokio::test]
async fn the_mock_answers_a_body_that_is_not_a_request_with_a_json_400() {
    let mock = mock().await;
    let http = reqwest::Client::new();
    for body in [&b"{not json"[..], b"\xff\xfe", b"{\"max_tokens\": 5}", b""] {
        let resp = http
            .post(format!("{}/v1/messages", mock.url()))
            .body(body.to_vec())
            .send()
            .await
            .expect("an answer");
        assert_eq!(resp.status().as_u16(), 400);
        let text = resp.text().await.expect("a body");
        let e = fusebox::anthropic::ErrorBody::parse(text.as_bytes()).expect("a JSON error body");
        assert_eq!(e.error.error_type, "invalid_request_error");
    }
    assert_eq!(mock.requests(""), 4, "counted under no model");
}

#[tokio::test]
async fn fields_fusebox_does_not_read_reach_the_upstream_untouched() {
    let mock = mock().await;
    let extra = serde_json::json!({
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "metadata": {"user_id": "u-1"},
        "a_field_from_the_future": [1, 2.5, null]
    });
    let mut req = ask("m", "hi");
    for (k, v) in extra.as_object().expect("an object") {
        req = req.with(k.clone(), v.clone());
    }
    client(&mock).send(&req).await.expect("answer");
    let body = &mock.seen()[0].body;
    for (k, v) in extra.as_object().expect("an object") {
        assert_eq!(body.get(k), Some(v), "{k}");
    }
    assert_eq!(body.get("max_tokens"), Some(&serde_json::json!(64)));
    assert_eq!(
        body.get("stream"),
        None,
        "a plain request sends no stream field"
    );
}

/// A redirect is never followed: the upstream's `location` could name another host, and the
/// request carries the caller's `x-api-key` (reqwest strips `authorization` on a cross-host
/// redirect, not `x-api-key`). Before the fix, a 302/307/308 from the upstream sent the key
/// to the host it named and returned that host's reply as a success.
#[tokio::test]
async fn a_redirect_is_not_followed_and_the_key_goes_nowhere_else() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    // The host a redirect points at: records whatever reaches it.
    let elsewhere = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let elsewhere_addr = elsewhere.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let seen_w = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = elsewhere.accept().await {
            let mut buf = vec![0u8; 16 * 1024];
            let n = s.read(&mut buf).await.unwrap_or(0);
            if let Ok(mut v) = seen_w.lock() {
                v.extend_from_slice(buf.get(..n).unwrap_or_default());
            }
            let body = r#"{"id":"x","type":"message","role":"assistant","model":"m","content":[],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":1}}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });

    for code in [
        "302 Found",
        "307 Temporary Redirect",
        "308 Permanent Redirect",
    ] {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream_addr = upstream.local_addr().expect("addr");
        let location = format!("http://localhost:{}/steal", elsewhere_addr.port());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                let mut buf = vec![0u8; 16 * 1024];
                let _ = s.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 {code}\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        let c = Client::builder()
            .base_url(format!("http://{upstream_addr}"))
            .api_key(ApiKey::new(KEY).expect("key"))
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let result = c.send(&ask("m", "hi")).await;
        let e = result.expect_err("a redirect is an error, not the other host's answer");
        assert_eq!(e.status.map(|s| s / 100), Some(3), "{code}: {e}");
        assert_eq!(e.classification.class, Class::Final, "{code}: {e}");
    }
    // Had a redirect been followed, the other host recorded the request before it answered.
    let seen = String::from_utf8_lossy(&seen.lock().expect("lock")).into_owned();
    assert!(
        seen.is_empty(),
        "a request reached the host the redirect named: {seen}"
    );
}

/// An upstream whose error message echoes the caller's key does not put the key into the
/// error fusebox returns (which callers log): before, `UpstreamError`'s Display and Debug
/// carried it.
#[tokio::test]
async fn an_error_message_echoing_the_key_does_not_carry_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            let mut buf = vec![0u8; 16 * 1024];
            let _ = s.read(&mut buf).await;
            let body = format!(
                r#"{{"type":"error","error":{{"type":"authentication_error","message":"invalid x-api-key: {KEY} (and again {KEY})"}},"request_id":"req_1"}}"#
            );
            let reply = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    let c = Client::builder()
        .base_url(format!("http://{addr}"))
        .api_key(ApiKey::new(KEY).expect("key"))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let e = c.send(&ask("m", "hi")).await.expect_err("a 401");
    assert_eq!(e.status, Some(401));
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains(KEY), "the key is in the error: {shown}");
    assert!(
        e.message.contains("invalid x-api-key: ***"),
        "{}",
        e.message
    );
}
