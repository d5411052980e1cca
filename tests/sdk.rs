//! A real client: the official `anthropic` Python SDK (tests/python/sdk_check.py, from PyPI in
//! the venv `.ci/run` creates) pointed at `fusebox serve` with `base_url`, non-streaming and
//! streaming, while the primary model answers 529: the SDK sees a normal answer from the
//! fallback model, and it does not retry on top of the proxy (its `max_retries` left at the
//! default, 2). The SDK's own requests are counted by an httpx hook in the script; the calls that
//! reached the upstream by the mock.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use fusebox::mock::{MockUpstream, Plan, Reply};
use serde_json::Value;
use support::serve::Serve;
use support::tools;

const PRIMARY: &str = "claude-primary";
const FALLBACK: &str = "claude-fallback";
/// A second model that fails too.
const BROKEN: &str = "claude-broken";
/// The API key the script sends (sdk_check.py's API_KEY).
const SDK_API_KEY: &str = "sk-ant-sdk-test-key-0123456789";
/// How long one step of the script may take (the SDK's import, then one call, or three with
/// its own retries and their backoff).
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_check.py")
}

/// The script as a child process: one Python (importing the SDK is slow on a busy machine)
/// that runs one step per line sent to it.
struct Sdk {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    describe: String,
}

impl Sdk {
    fn start() -> Sdk {
        let python = tools::python_with_anthropic();
        let mut child = python
            .command()
            .arg(script())
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("ANTHROPIC_BASE_URL")
            .env_remove("ANTHROPIC_AUTH_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.describe()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Sdk {
            stdin: child.stdin.take(),
            child,
            lines,
            describe: python.describe(),
        }
    }

    /// Runs one step and returns what the script printed for it.
    fn step(
        &mut self,
        scenario: &str,
        base_url: &str,
        model: &str,
        feature: Option<&str>,
    ) -> Value {
        let step = serde_json::json!({
            "scenario": scenario, "base_url": base_url, "model": model, "feature": feature,
        });
        let stdin = self.stdin.as_mut().expect("the script's stdin");
        writeln!(stdin, "{step}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot write to {} sdk_check.py: {e}", self.describe));
        match self.lines.recv_timeout(STEP_TIMEOUT) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("sdk_check.py printed no JSON ({e}): {line}")),
            Err(_) => panic!(
                "sdk_check.py gave no answer to {step} within {STEP_TIMEOUT:?} (its stderr is \
                 above; status {:?})",
                self.child.try_wait()
            ),
        }
    }
}

impl Drop for Sdk {
    fn drop(&mut self) {
        // End of input: the script exits; kill it if it does not.
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(upstream: &str) -> String {
    format!(
        r#"
namespace = "sdk-test"

[server]
upstream = "{upstream}"
default_feature = "chat"

# Retries: at most 2 attempts per target, quickly.
[retry]
max_attempts = 2
base = "10ms"
cap = "20ms"

# Nothing opens during the test: every call reaches the mock.
[breaker]
consecutive_failures = 100
failure_rate = false

[features.chat]
chain = ["{PRIMARY}", "{FALLBACK}"]

# Both models fail, and no canned answer: the proxy answers with the last error.
[features.all-failing]
chain = ["{PRIMARY}", "{BROKEN}"]
"#
    )
}

fn header<'a>(result: &'a Value, name: &str) -> Option<&'a str> {
    result["headers"][name].as_str()
}

#[test]
fn the_official_sdk_gets_the_fallback_answer_and_does_not_retry_on_top_of_the_proxy() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mock = runtime.block_on(async {
        MockUpstream::builder()
            .model(PRIMARY, Plan::always(Reply::overloaded()))
            .model(FALLBACK, Plan::answer())
            .model(BROKEN, Plan::always(Reply::overloaded()))
            .start()
            .await
            .expect("start the mock upstream")
    });
    let dir = support::nginx::make_temp_dir("sdk");
    let config_path = dir.join("fusebox.toml");
    std::fs::write(&config_path, config(&mock.url())).expect("write the config");
    let proxy = Serve::start(env!("CARGO_BIN_EXE_fusebox"), "sdk", &config_path, &[]);
    let base_url = proxy.url();
    let mut sdk = Sdk::start();

    // Non-streaming, through the fallback.
    let created = sdk.step("create", &base_url, PRIMARY, None);
    assert_eq!(created["ok"], true, "{created}");
    assert_eq!(
        created["model"], FALLBACK,
        "the SDK parsed the fallback's answer: {created}"
    );
    assert!(
        created["text"]
            .as_str()
            .is_some_and(|t| t.contains(FALLBACK)),
        "{created}"
    );
    assert_eq!(created["status"], 200, "{created}");
    assert_eq!(
        header(&created, "x-fusebox-model"),
        Some(FALLBACK),
        "{created}"
    );
    assert_eq!(
        header(&created, "x-fusebox-tier"),
        Some("fallback"),
        "{created}"
    );
    assert_eq!(
        created["requests_sent"], 1,
        "one request from the SDK: {created}"
    );
    if !created["retries_taken"].is_null() {
        assert_eq!(created["retries_taken"], 0, "{created}");
    }
    let primary_calls = mock.requests(PRIMARY);
    assert!(
        (1..=2).contains(&primary_calls),
        "the proxy tried the primary (at most max_attempts = 2 times): {primary_calls}"
    );
    assert_eq!(mock.requests(FALLBACK), 1, "the fallback answered once");
    // The SDK's anthropic-version reached the upstream. (Its key did too, but newer SDKs send
    // it as `authorization: Bearer`, which the mock does not record: `auth` says which.)
    let seen = mock.seen();
    assert!(
        seen.iter().all(|s| s.version.is_some()),
        "anthropic-version passed through: {seen:?}"
    );
    assert!(
        ["x-api-key", "authorization"].contains(&created["auth"].as_str().unwrap_or("")),
        "{created}"
    );

    // Streaming, through the fallback.
    mock.reset_counts();
    let streamed = sdk.step("stream", &base_url, PRIMARY, None);
    assert_eq!(streamed["ok"], true, "{streamed}");
    assert_eq!(streamed["model"], FALLBACK, "{streamed}");
    assert!(
        streamed["text"]
            .as_str()
            .is_some_and(|t| t.contains(FALLBACK)),
        "the text arrived through the stream's deltas: {streamed}"
    );
    assert!(
        streamed["chunks"].as_u64().is_some_and(|n| n >= 1),
        "{streamed}"
    );
    assert_eq!(streamed["stop_reason"], "end_turn", "{streamed}");
    assert_eq!(
        header(&streamed, "x-fusebox-model"),
        Some(FALLBACK),
        "{streamed}"
    );
    assert_eq!(streamed["requests_sent"], 1, "{streamed}");
    assert_eq!(mock.requests(FALLBACK), 1);
    let seen = mock.seen();
    assert!(
        seen.iter().all(|s| s.stream),
        "every upstream attempt was a stream: {seen:?}"
    );

    // Every model of the chain failing, no canned answer: the proxy's error after its chain,
    // which the SDK does not retry (x-should-retry: false) although its status (529) is one
    // it retries by default.
    mock.reset_counts();
    let failed = sdk.step("error", &base_url, PRIMARY, Some("all-failing"));
    assert_eq!(failed["ok"], false, "{failed}");
    assert_eq!(header(&failed, "x-should-retry"), Some("false"), "{failed}");
    assert_eq!(
        failed["requests_sent"], 1,
        "the SDK sent one request and did not retry it: {failed}"
    );
    let (primary_calls, broken_calls) = (mock.requests(PRIMARY), mock.requests(BROKEN));
    assert!(
        (1..=2).contains(&primary_calls) && (1..=2).contains(&broken_calls),
        "one request's attempts reached the upstream (each model at most max_attempts = 2 \
         times), not three requests' worth: {primary_calls} + {broken_calls}"
    );

    // Contrast: the same SDK pointed straight at the failing upstream retries twice (three
    // requests), so the counts above would show retries on top of the proxy.
    mock.reset_counts();
    let direct = sdk.step("error", &mock.url(), PRIMARY, None);
    assert_eq!(direct["ok"], false, "{direct}");
    assert_eq!(
        direct["requests_sent"], 3,
        "the SDK's own two retries: {direct}"
    );
    assert_eq!(mock.requests(PRIMARY), 3);

    // The SDK's API key appears nowhere in the proxy's log.
    let log = proxy.log();
    assert!(
        !log.contains(SDK_API_KEY) && !log.contains("0123456789"),
        "the API key appears in the proxy's log:\n{log}"
    );
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
    runtime.block_on(async move { drop(mock) });
}

#[test]
fn the_script_reports_usage_errors() {
    // The script itself: a wrong call exits 2 (so a broken invocation cannot pass as a run).
    let python = tools::python_with_anthropic();
    let status = Command::new(&python.program)
        .args(&python.prefix)
        .arg(script())
        .arg("an-argument-it-does-not-take")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the script");
    assert_eq!(status.code(), Some(2));
}
