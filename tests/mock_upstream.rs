//! The fake upstream as a server of its own: per-model in-flight and peak counters, the
//! `/_mock/` control API, the fixed-response mode, and the `fusebox mock-upstream` binary.

use std::time::{Duration, Instant};

use fusebox::mock::{MockUpstream, Plan, Reply};
use serde_json::{json, Value};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

fn body(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 16, "stream": stream,
           "messages": [{"role": "user", "content": "hello there"}]})
}

async fn ask(base: &str, model: &str, stream: bool) -> reqwest::Response {
    http()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .json(&body(model, stream))
        .send()
        .await
        .expect("the mock answers")
}

async fn control(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = http().request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("the control API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON"))
}

/// Waits (bounded, generously) until `cond` holds; the result is asserted by the caller.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

#[tokio::test]
async fn streams_count_in_flight_until_their_client_goes_away_and_the_peak_stays() {
    let mock = MockUpstream::builder()
        .model("slow", Plan::always(Reply::StallMidStream))
        .start()
        .await
        .expect("mock binds");
    let base = mock.url();
    let mut open = Vec::new();
    for _ in 0..3 {
        let resp = ask(&base, "slow", true).await;
        assert_eq!(resp.status(), 200);
        open.push(resp);
    }
    assert_eq!(mock.in_flight("slow"), 3, "three stalled streams are open");
    assert_eq!(mock.peak_in_flight("slow"), 3);
    // A quick model alongside does not touch the slow one's counters.
    assert_eq!(ask(&base, "quick", false).await.status(), 200);
    assert!(eventually(|| mock.in_flight("quick") == 0).await);
    assert_eq!(mock.peak_in_flight("quick"), 1);

    open.pop();
    assert!(
        eventually(|| mock.in_flight("slow") == 2).await,
        "a client that goes away ends its stream's time in flight (in flight: {})",
        mock.in_flight("slow")
    );
    assert_eq!(mock.peak_in_flight("slow"), 3, "the peak stays");

    mock.reset_counts();
    assert_eq!(mock.requests("slow"), 0);
    assert_eq!(
        mock.peak_in_flight("slow"),
        2,
        "after a reset the peak restarts from what is in flight"
    );
    let (status, stats) = control(reqwest::Method::GET, format!("{base}/_mock/stats"), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        stats["models"]["slow"],
        json!({"requests": 0, "in_flight": 2, "peak_in_flight": 2})
    );
    drop(open);
    assert!(eventually(|| mock.in_flight("slow") == 0).await);
}

#[tokio::test]
async fn a_plan_set_over_http_changes_the_answers_and_delete_restores_it() {
    let mock = MockUpstream::builder()
        .model("m", Plan::answer().text("from the start"))
        .start()
        .await
        .expect("mock binds");
    let base = mock.url();
    let answer: Value = ask(&base, "m", false).await.json().await.expect("JSON");
    assert_eq!(answer["content"][0]["text"], "from the start");

    let (status, echo) = control(
        reqwest::Method::PUT,
        format!("{base}/_mock/models/m"),
        Some(json!({"status": 529, "retry_after": 7})),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    let resp = ask(&base, "m", false).await;
    assert_eq!(resp.status(), 529);
    assert_eq!(resp.headers()["retry-after"], "7");
    let err: Value = resp.json().await.expect("JSON");
    assert_eq!(err["error"]["type"], "overloaded_error");

    control(
        reqwest::Method::PUT,
        format!("{base}/_mock/models/m"),
        Some(json!({"text": "changed", "latency_ms": 1})),
    )
    .await;
    let answer: Value = ask(&base, "m", false).await.json().await.expect("JSON");
    assert_eq!(answer["content"][0]["text"], "changed");

    let (status, _) = control(
        reqwest::Method::DELETE,
        format!("{base}/_mock/models/m"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let answer: Value = ask(&base, "m", false).await.json().await.expect("JSON");
    assert_eq!(answer["content"][0]["text"], "from the start");

    let (_, stats) = control(reqwest::Method::GET, format!("{base}/_mock/stats"), None).await;
    assert_eq!(stats["models"]["m"]["requests"], 4);
    assert_eq!(stats["total_requests"], 4);
}

#[tokio::test]
async fn a_mid_stream_error_comes_after_the_200_and_failure_rate_one_always_fails() {
    let mock = MockUpstream::builder().start().await.expect("mock binds");
    let base = mock.url();
    control(
        reqwest::Method::PUT,
        format!("{base}/_mock/models/m"),
        Some(json!({"status": 529, "mid_stream_error": true})),
    )
    .await;
    let resp = ask(&base, "m", true).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("body");
    assert!(text.contains("event: message_start"), "{text}");
    assert!(
        text.contains("event: error") && text.contains("overloaded_error"),
        "{text}"
    );
    assert_eq!(ask(&base, "m", false).await.status(), 529);

    control(
        reqwest::Method::PUT,
        format!("{base}/_mock/default"),
        Some(json!({"status": 429, "failure_rate": 1.0})),
    )
    .await;
    for _ in 0..5 {
        assert_eq!(ask(&base, "anything", false).await.status(), 429);
    }
    control(
        reqwest::Method::PUT,
        format!("{base}/_mock/default"),
        Some(json!({"failure_rate": 0.0})),
    )
    .await;
    assert_eq!(ask(&base, "anything", false).await.status(), 200);
}

#[tokio::test]
async fn bad_plans_are_refused_naming_the_field_and_change_nothing() {
    let mock = MockUpstream::builder().start().await.expect("mock binds");
    let base = mock.url();
    let url = format!("{base}/_mock/models/m");
    for (bad, field) in [
        (json!({"failure_rate": 1.5}), "failure_rate"),
        (json!({"status": 200}), "status"),
        (json!({"status": 99999}), "status"),
        (json!({"latency_ms": -1}), "latency_ms"),
        (json!({"retry_after": 5}), "retry_after"),
        (json!({"retry_after": "a\nb", "status": 429}), "retry_after"),
        (json!({"mid_stream_error": "no spaces"}), "mid_stream_error"),
        (json!({"colour": "red"}), "colour"),
    ] {
        let (status, err) = control(reqwest::Method::PUT, url.clone(), Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad} is refused");
        let message = err["error"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{bad}: {message:?} names {field}");
    }
    let raw = http()
        .put(&url)
        .body("{not json")
        .send()
        .await
        .expect("answers");
    assert_eq!(raw.status(), 400);
    assert_eq!(
        ask(&base, "m", false).await.status(),
        200,
        "the plan is unchanged"
    );
}

#[tokio::test]
async fn reset_restores_the_start_plans_and_zeroes_the_counts() {
    let mock = MockUpstream::builder()
        .model("m", Plan::always(Reply::status(503)))
        .start()
        .await
        .expect("mock binds");
    let base = mock.url();
    mock.set("m", Plan::answer());
    assert_eq!(ask(&base, "m", false).await.status(), 200);
    let (status, _) = control(reqwest::Method::POST, format!("{base}/_mock/reset"), None).await;
    assert_eq!(status, 200);
    assert_eq!(mock.requests("m"), 0);
    assert_eq!(ask(&base, "m", false).await.status(), 503);
    control(
        reqwest::Method::POST,
        format!("{base}/_mock/reset_counts"),
        None,
    )
    .await;
    assert_eq!(mock.requests("m"), 0);
    assert_eq!(ask(&base, "m", false).await.status(), 503, "plans stay");
}

#[tokio::test]
async fn the_fixed_response_mode_answers_anything_the_same_and_counts_it() {
    let mock = MockUpstream::builder()
        .model("m", Plan::always(Reply::overloaded()))
        .fixed_response(true)
        .start()
        .await
        .expect("mock binds");
    let base = mock.url();
    let a: Value = ask(&base, "m", false).await.json().await.expect("JSON");
    let garbage = http()
        .post(format!("{base}/v1/messages"))
        .body("not even json")
        .send()
        .await
        .expect("answers");
    assert_eq!(garbage.status(), 200);
    let b: Value = garbage.json().await.expect("JSON");
    assert_eq!(a, b);
    assert_eq!(a["type"], "message");
    assert_eq!(mock.total_requests(), 2);
    let (status, _) = control(
        reqwest::Method::PUT,
        format!("{base}/_mock/models/m"),
        Some(json!({"status": 529})),
    )
    .await;
    assert_eq!(status, 409, "the fixed mode has no plans to change");
    let (_, stats) = control(reqwest::Method::GET, format!("{base}/_mock/stats"), None).await;
    assert_eq!(stats["total_requests"], 2);
    assert_eq!(stats["fixed_response"], true);
}

/// A `fusebox mock-upstream` process, killed when dropped.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `fusebox mock-upstream ARGS --listen 127.0.0.1:0` and returns it with its base URL,
/// read from the `listening on ADDR` line.
fn spawn_mock(args: &[&str]) -> (Process, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fusebox"))
        .arg("mock-upstream")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("fusebox runs");
    let stdout = child.stdout.take().expect("stdout");
    let process = Process(child);
    let mut first = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut first)
        .expect("a first line");
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {first:?}"));
    assert!(!addr.ends_with(":0"), "the real port is printed: {first:?}");
    (process, format!("http://{addr}"))
}

#[tokio::test]
async fn the_binary_fails_a_model_as_its_flags_say_and_a_plan_changes_over_http() {
    let (_process, base) = spawn_mock(&[
        "--fail",
        "primary=529",
        "--retry-after",
        "5",
        "--latency",
        "fallback=5ms",
        "--fail",
        "*=503",
        "--failure-rate",
        "*=0",
    ]);
    let resp = ask(&base, "primary", false).await;
    assert_eq!(resp.status(), 529);
    assert_eq!(resp.headers()["retry-after"], "5");
    assert_eq!(ask(&base, "fallback", false).await.status(), 200);
    assert_eq!(
        ask(&base, "other", false).await.status(),
        200,
        "`*` with failure rate 0 never fails"
    );

    let (status, _) = control(
        reqwest::Method::PUT,
        format!("{base}/_mock/models/primary"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ask(&base, "primary", false).await.status(), 200);
    let (_, stats) = control(reqwest::Method::GET, format!("{base}/_mock/stats"), None).await;
    assert_eq!(stats["models"]["primary"]["requests"], 2);
}

#[test]
fn bad_flags_exit_two_naming_the_flag() {
    for (args, flag) in [
        (&["--failure-rate", "m=2"][..], "--failure-rate"),
        (&["--fail", "m=200"][..], "--fail"),
        (&["--fail", "529"][..], "--fail"),
        (&["--latency", "m=soon"][..], "--latency"),
        (&["--retry-after", "5"][..], "--retry-after"),
        (&["--listen", "nowhere"][..], "--listen"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fusebox"))
            .arg("mock-upstream")
            .args(args)
            .output()
            .expect("fusebox runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

/// `POST /v1/messages/count_tokens` answers `{"input_tokens": N}` as the API does (so the
/// proxy's pass-through can be tried against the mock), even while the model's plan fails
/// every call (counting says nothing about a model's health); a body without `model` and
/// `messages` is a 400 in the API's error shape.
#[tokio::test]
async fn count_tokens_answers_input_tokens_whatever_the_plan() {
    let mock = MockUpstream::builder().start().await.expect("mock binds");
    mock.set("m", Plan::always(Reply::overloaded()));
    let count = |body: Value| {
        let url = format!("{}/v1/messages/count_tokens", mock.url());
        async move {
            let resp = http()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("the mock answers");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("JSON"))
        }
    };
    let (status, v) = count(json!({"model": "m", "system": "be brief",
        "messages": [{"role": "user", "content": "hello there, how are you today?"}]}))
    .await;
    assert_eq!(status, 200, "{v}");
    // "be brief" (8 bytes) + "user" (4) + the text (31): 43 bytes, 10 tokens.
    assert_eq!(v, json!({"input_tokens": 10}));
    let (status, v) = count(json!({"messages": []})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        ask(&mock.url(), "m", false).await.status().as_u16(),
        529,
        "the plan still applies to messages"
    );
}
