//! The `fusebox` binary: `check` validates a configuration (naming the bad field), `status`
//! and `force` work against a real spawned `redis-server` and agree with the library, usage
//! errors exit non-zero. Every run of the binary is bounded in time.

// Not every test binary uses everything the shared harness exports.
#[allow(unused_imports)]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fusebox::{CircuitState, Config, Coordinator};
use support::RedisServer;

/// Longest any one run of the binary may take.
const RUN_BUDGET: Duration = Duration::from_secs(30);

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    /// Exited non-zero, and not by a panic (101) or a signal.
    fn assert_refused(&self) {
        assert!(
            !self.status.success(),
            "expected a non-zero exit:\n{self:#?}"
        );
        assert!(
            self.status.code().is_some_and(|c| c != 101),
            "expected a clean error exit, not a panic or a signal:\n{self:#?}"
        );
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
    }

    fn assert_ok(&self) {
        assert!(self.status.success(), "expected success:\n{self:#?}");
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fusebox")
}

/// Waits for `child` at most [`RUN_BUDGET`]; kills it and panics past that.
fn wait_bounded(child: &mut std::process::Child, args: &[&str]) -> ExitStatus {
    let deadline = Instant::now() + RUN_BUDGET;
    loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => return status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`fusebox {args:?}` ran past {RUN_BUDGET:?}");
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Runs the binary with `args` (stdin closed) and collects its output.
fn fusebox(args: &[&str]) -> Run {
    use std::io::Read;
    let start = Instant::now();
    let mut child = Command::new(bin())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the fusebox binary");
    // Outputs are small (well under a pipe buffer), so reading after exit cannot deadlock.
    let status = wait_bounded(&mut child, args);
    let took = start.elapsed();
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    Run {
        status,
        stdout,
        stderr,
        took,
    }
}

/// A TOML file in the temp dir, removed on drop.
struct TempToml {
    path: PathBuf,
}

impl TempToml {
    fn new(text: &str) -> TempToml {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "fusebox-cli-test-{}-{}.toml",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).expect("write the temp TOML");
        TempToml { path }
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A configuration on `server`, with a generous store timeout (the test machine is busy).
fn redis_toml(server: &RedisServer, namespace: &str) -> TempToml {
    TempToml::new(&format!(
        "namespace = \"{namespace}\"\n\n[redis]\nurl = \"{}\"\ntimeout = \"2s\"\nconnect_timeout = \"2s\"\n\n[features.chat]\n",
        server.url()
    ))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------------

#[test]
fn check_accepts_a_valid_file_and_prints_it_resolved() {
    let file = TempToml::new(
        r#"
namespace = "my-app"

[breaker]
consecutive_failures = 7

[targets."claude-haiku-4-5"]
open_duration = "30s"

[features.chat]
max_concurrent = 20
max_wait = "200ms"
rate = { requests = 100, per = "1m", burst = 20 }
"#,
    );
    let run = fusebox(&["check", file.path()]);
    run.assert_ok();
    assert!(
        run.stdout.starts_with(&format!("{}: ok\n", file.path())),
        "{run:#?}"
    );
    for shown in [
        "\"my-app\"",
        "claude-haiku-4-5",
        "consecutive_failures: Some(",
        "7,",
        "20,",
    ] {
        assert!(
            run.stdout.contains(shown),
            "{shown:?} missing:\n{}",
            run.stdout
        );
    }
    assert_eq!(run.stderr, "");
}

/// The configuration example of the README is valid as written.
#[test]
fn check_accepts_the_readme_example() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let section = readme
        .split("## Configuration")
        .nth(1)
        .expect("a Configuration section");
    let toml = section
        .split("```toml")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a toml block in the Configuration section");
    let file = TempToml::new(toml);
    fusebox(&["check", file.path()]).assert_ok();
}

#[test]
fn check_rejects_an_out_of_range_value_naming_the_field() {
    let file = TempToml::new("[features.x]\nmax_concurrent = 0\n");
    let run = fusebox(&["check", file.path()]);
    run.assert_refused();
    assert!(
        run.stderr.contains("features.x.max_concurrent"),
        "the field is named:\n{run:#?}"
    );
    assert!(run.stderr.contains("out of range"), "{run:#?}");
    assert!(!run.stdout.contains("ok"), "{run:#?}");

    let file = TempToml::new("[breaker]\nopen_duration = \"0s\"\n");
    let run = fusebox(&["check", file.path()]);
    run.assert_refused();
    assert!(run.stderr.contains("breaker.open_duration"), "{run:#?}");

    let file = TempToml::new("[redis]\nurl = \"http://127.0.0.1:6379\"\n");
    let run = fusebox(&["check", file.path()]);
    run.assert_refused();
    assert!(run.stderr.contains("redis.url"), "{run:#?}");
}

#[test]
fn check_rejects_unknown_fields() {
    for (text, field) in [
        ("[features.x]\nmax_concurent = 3\n", "max_concurent"),
        ("namespce = \"app\"\n", "namespce"),
        (
            "[breaker]\nconsecutive_failure = 3\n",
            "consecutive_failure",
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1:6379\"\ntimout = \"1s\"\n",
            "timout",
        ),
    ] {
        let file = TempToml::new(text);
        let run = fusebox(&["check", file.path()]);
        run.assert_refused();
        assert!(
            run.stderr.contains("unknown field") && run.stderr.contains(field),
            "{text:?}: {run:#?}"
        );
    }
}

/// A value of the wrong type is rejected naming the field, like an out-of-range value (README:
/// "Every invalid value is rejected ... with the field named").
#[test]
fn check_names_the_field_of_a_value_of_the_wrong_type() {
    for (text, field) in [
        ("[features.x]\nmax_concurrent = \"ten\"\n", "max_concurrent"),
        ("[features.x]\nlease = \"soon\"\n", "lease"),
    ] {
        let file = TempToml::new(text);
        let run = fusebox(&["check", file.path()]);
        run.assert_refused();
        assert!(
            run.stderr.contains(field),
            "{text:?}: the error does not name the field {field:?}: {}",
            run.stderr
        );
    }
}

/// `check` output goes to terminals and CI logs: it must not show the Redis password.
#[test]
fn check_does_not_print_the_redis_password() {
    let file = TempToml::new("[redis]\nurl = \"redis://fb:hunter2secret@10.0.0.5:6379\"\n");
    let run = fusebox(&["check", file.path()]);
    run.assert_ok();
    assert!(
        !run.stdout.contains("hunter2secret") && !run.stderr.contains("hunter2secret"),
        "`fusebox check` prints the Redis password:\n{}",
        run.stdout
    );
}

#[test]
fn check_of_a_missing_file_fails() {
    let run = fusebox(&["check", "/nonexistent/fusebox.toml"]);
    run.assert_refused();
    assert!(run.stderr.contains("cannot read"), "{run:#?}");
}

/// Writing to a closed pipe (`fusebox check f.toml | head -1`) is an error exit, not a panic.
#[test]
fn output_to_a_closed_pipe_is_not_a_panic() {
    let file = TempToml::new("[features.chat]\n");
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let args = ["check", file.path()];
    let mut child = Command::new(bin())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_bounded(&mut child, &args);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(
        status.code() != Some(101) && !stderr.contains("panicked"),
        "exit {status}, stderr:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// usage
// ---------------------------------------------------------------------------------------------

#[test]
fn without_arguments_it_prints_usage_and_fails() {
    for args in [
        &[][..],
        &["frobnicate"][..],
        &["check"][..],
        &["status", "f.toml"][..],
        &["check", "a.toml", "b.toml"][..],
    ] {
        let run = fusebox(args);
        run.assert_refused();
        assert!(run.stderr.contains("usage:"), "{args:?}: {run:#?}");
        for sub in ["check", "status", "force"] {
            assert!(run.stderr.contains(sub), "{args:?}: {run:#?}");
        }
        assert_eq!(run.stdout, "", "{args:?}");
    }
}

#[test]
fn force_with_an_unknown_command_prints_usage_and_fails() {
    let file = TempToml::new("[features.chat]\n");
    let run = fusebox(&["force", file.path(), "m", "sideways"]);
    run.assert_refused();
    assert!(
        run.stderr.contains("sideways") && run.stderr.contains("usage:"),
        "{run:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// status and force against Redis
// ---------------------------------------------------------------------------------------------

/// `force open` -> `status` shows ForcedOpen, and so does any coordinator on the same Redis
/// and namespace; `reset` brings it back; a repeated command reports "already".
#[test]
fn force_and_status_against_redis() {
    let server = RedisServer::start();
    let file = redis_toml(&server, "cli-test");

    let run = fusebox(&["status", file.path(), "m"]);
    run.assert_ok();
    assert!(run.stdout.contains("state: Closed"), "{run:#?}");
    assert!(!run.stdout.contains("store unreachable"), "{run:#?}");

    let run = fusebox(&["force", file.path(), "m", "open"]);
    run.assert_ok();
    assert!(run.stdout.contains("m: closed -> forced_open"), "{run:#?}");
    let run = fusebox(&["status", file.path(), "m"]);
    run.assert_ok();
    assert!(run.stdout.contains("state: ForcedOpen"), "{run:#?}");
    let run = fusebox(&["force", file.path(), "m", "open"]);
    run.assert_ok();
    assert!(run.stdout.contains("already forced_open"), "{run:#?}");

    // The library sees what the CLI did (same keys), and the CLI what the library did.
    let text = std::fs::read_to_string(&file.path).expect("read the TOML");
    let config = Config::from_toml(&text).expect("valid");
    let rt = runtime();
    rt.block_on(async {
        let c = Coordinator::new(config).await.expect("build");
        let s = c.snapshot("m").await.expect("snapshot");
        assert_eq!(s.state, CircuitState::ForcedOpen);
        assert!(!c.is_degraded());
        let r = c.call("chat", "m", || async { Ok::<_, String>(()) }).await;
        assert!(
            matches!(
                r,
                Err(fusebox::Error::Rejected(fusebox::Rejection::CircuitOpen {
                    state: CircuitState::ForcedOpen,
                    ..
                }))
            ),
            "{r:?}"
        );
        // Trip another target through the library.
        for _ in 0..5 {
            let r = c
                .call("chat", "other", || async { Err::<(), _>("500") })
                .await;
            assert!(r.is_ok(), "{r:?}");
        }
        c.flush(Duration::from_secs(5)).await;
    });
    let run = fusebox(&["status", file.path(), "other"]);
    run.assert_ok();
    assert!(run.stdout.contains("state: Open"), "{run:#?}");

    let run = fusebox(&["force", file.path(), "m", "reset"]);
    run.assert_ok();
    assert!(run.stdout.contains("m: forced_open -> closed"), "{run:#?}");
    let run = fusebox(&["status", file.path(), "m"]);
    run.assert_ok();
    assert!(run.stdout.contains("state: Closed"), "{run:#?}");

    for (cmd, state) in [("closed", "ForcedClosed"), ("disable", "Disabled")] {
        fusebox(&["force", file.path(), "m", cmd]).assert_ok();
        let run = fusebox(&["status", file.path(), "m"]);
        assert!(run.stdout.contains(&format!("state: {state}")), "{run:#?}");
    }

    // Another namespace on the same Redis is not affected.
    let other_ns = redis_toml(&server, "cli-test-2");
    let run = fusebox(&["status", other_ns.path(), "m"]);
    assert!(run.stdout.contains("state: Closed"), "{run:#?}");
}

#[test]
fn status_of_an_invalid_target_is_an_error() {
    let server = RedisServer::start();
    let file = redis_toml(&server, "cli-test");
    for target in ["a b", "a{b}"] {
        let run = fusebox(&["status", file.path(), target]);
        run.assert_refused();
        assert!(run.stderr.contains("target"), "{run:#?}");
        let run = fusebox(&["force", file.path(), target, "open"]);
        run.assert_refused();
        assert!(run.stderr.contains("target"), "{run:#?}");
    }
}

/// With Redis down, `status` and `force` fail with the cause (connection refused), never
/// showing this process's local state as the fleet's: no hang, no panic.
#[test]
fn status_and_force_with_redis_down() {
    let mut server = RedisServer::start();
    let file = redis_toml(&server, "cli-test");
    server.kill();

    let run = fusebox(&["status", file.path(), "m"]);
    run.assert_refused();
    assert!(run.stderr.contains("connection refused"), "{run:#?}");
    assert!(!run.stdout.contains("Closed"), "{run:#?}");
    assert!(run.took < Duration::from_secs(10), "{run:#?}");

    let run = fusebox(&["force", file.path(), "m", "open"]);
    run.assert_refused();
    assert!(run.stderr.contains("connection refused"), "{run:#?}");
    assert!(run.took < Duration::from_secs(10), "{run:#?}");
}
