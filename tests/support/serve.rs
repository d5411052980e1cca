//! `fusebox serve` as a child process: the binary the test was built with (the caller passes
//! `env!("CARGO_BIN_EXE_fusebox")`, which only tests of the `proxy` feature have), on a free
//! loopback port (`--listen 127.0.0.1:0`; the address is read from its first line on stdout).

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::nginx::make_temp_dir;
use super::redis_server::log_tail;

/// How long a replica gets to print its address.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Environment variables a developer's shell may carry that would change what the process
/// does: removed, and set only as the test says.
const SCRUBBED: &[&str] = &[
    "FUSEBOX_CONFIG",
    "FUSEBOX_LISTEN",
    "FUSEBOX_UPSTREAM",
    "FUSEBOX_REDIS_URL",
    "FUSEBOX_ADMIN_TOKEN",
    "REDIS_URL",
];

/// A running `fusebox serve`; killed on drop.
pub struct Serve {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
    name: String,
}

impl Serve {
    /// Starts `bin -c config serve --listen 127.0.0.1:0` with `env` added, and waits for its
    /// "listening on ADDR" line. `name` labels it in messages (and names its log file).
    pub fn start(bin: &str, name: &str, config: &Path, env: &[(&str, &str)]) -> Serve {
        let dir = make_temp_dir(&format!("serve-{name}"));
        let log_path = dir.join("stderr.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let mut command = Command::new(bin);
        command
            .arg("-c")
            .arg(config)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for var in SCRUBBED {
            command.env_remove(var);
        }
        command.env("RUST_LOG", "info");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {bin} serve: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads the address line, then drains stdout so that the process never blocks on it.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(addr) = line
                        .split("listening on ")
                        .nth(1)
                        .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                    {
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
            }
        });
        let mut serve = Serve {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            name: name.to_owned(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => {
                    serve.addr = addr;
                    return serve;
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Some(Ok(Some(status))) = serve.child.as_mut().map(|c| c.try_wait()) {
                        panic!(
                            "fusebox serve ({name}) exited before listening ({status}); its stderr:\n{}",
                            serve.log_tail()
                        );
                    }
                }
                Err(_) => panic!(
                    "fusebox serve ({name}) did not print its address within {READY_TIMEOUT:?}; its stderr:\n{}",
                    serve.log_tail()
                ),
            }
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its stderr (the log) so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.join("stderr.log"))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "fusebox serve ({}) at {}, last lines of its log:\n{}",
                self.name,
                self.addr,
                self.log_tail()
            );
        }
        self.kill();
        if std::env::var_os("FUSEBOX_KEEP_REDIS_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
