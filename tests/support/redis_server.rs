//! A `redis-server` child process owned by the test.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server gets to answer PING after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many fresh ports to try when a start fails because the port was taken meanwhile.
const PORT_TRIES: usize = 5;
/// Lines of the server log quoted in panic messages.
const LOG_TAIL_LINES: usize = 30;

/// The `redis-server` binary: `FUSEBOX_REDIS_SERVER_BIN` or `redis-server` (looked up on `PATH`).
pub fn redis_server_bin() -> String {
    std::env::var("FUSEBOX_REDIS_SERVER_BIN")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis-server".to_string())
}

/// The `redis-cli` binary: `FUSEBOX_REDIS_CLI_BIN` or `redis-cli` (looked up on `PATH`).
pub fn redis_cli_bin() -> String {
    std::env::var("FUSEBOX_REDIS_CLI_BIN")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis-cli".to_string())
}

/// Whether `redis-server --version` runs.
pub fn redis_server_available() -> bool {
    Command::new(redis_server_bin())
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// A `redis-server` child process on a free 127.0.0.1 port, killed on drop (its temp dir with
/// the log is removed too, unless `FUSEBOX_KEEP_REDIS_DIRS` is set).
///
/// Always spawns its own process, whatever `REDIS_URL` says: fault tests need a process they
/// own. The child's stdout/stderr go to `redis.log` in its temp dir; panics quote its last lines.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    pid: u32,
    dir: PathBuf,
    log_path: PathBuf,
    cluster: bool,
    extra: Vec<String>,
}

/// Why one spawn attempt failed.
enum StartError {
    /// The port (or the cluster bus port) was taken: try another one.
    PortInUse,
    /// Anything else: give up with this message.
    Fatal(String),
}

impl RedisServer {
    /// Starts a plain `redis-server`. Panics with a clear message if the binary is missing or the
    /// server does not answer PING within 10 s.
    pub fn start() -> RedisServer {
        Self::start_with_args(&[])
    }

    /// Like [`RedisServer::start`], with extra `redis-server` arguments appended (e.g.
    /// `&["--maxmemory", "1mb"]`; later arguments override earlier ones).
    pub fn start_with_args(extra: &[&str]) -> RedisServer {
        Self::launch(false, extra)
    }

    /// A node for a Redis Cluster: `--cluster-enabled yes` with its own `nodes.conf`, on a port
    /// whose cluster bus port (port + 10000) was free as well.
    pub fn start_cluster_node(extra: &[&str]) -> RedisServer {
        Self::launch(true, extra)
    }

    fn launch(cluster: bool, extra: &[&str]) -> RedisServer {
        let dir = make_temp_dir();
        let mut server = RedisServer {
            child: None,
            port: 0,
            pid: 0,
            log_path: dir.join("redis.log"),
            dir,
            cluster,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for attempt in 1..=PORT_TRIES {
            server.port = free_port(cluster);
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(StartError::PortInUse) if attempt < PORT_TRIES => continue,
                Err(StartError::PortInUse) => panic!(
                    "redis-server could not get a free port in {PORT_TRIES} tries; last log lines:\n{}",
                    server.log_tail()
                ),
                Err(StartError::Fatal(msg)) => panic!("{msg}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The process id of the current (or last, after [`RedisServer::kill`]) server process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's temp dir (`--dir`), holding `redis.log` and, for cluster nodes, `nodes.conf`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file the server's stdout/stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the process is still alive (a paused process counts as running).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL the server and reap it. Idempotent. The temp dir stays (for
    /// [`RedisServer::restart`]); it is removed on drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if it already exited; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, starts it again on the SAME port with the same arguments and
    /// dir (a cluster node keeps its `nodes.conf`, so it rejoins), and waits until PING answers.
    /// Panics if that fails (e.g. someone else took the port meanwhile).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The port may linger for a moment; retry on the same port only.
                Err(StartError::PortInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(StartError::PortInUse) => panic!(
                    "redis-server could not restart on port {}: it stays in use; last log lines:\n{}",
                    self.port,
                    self.log_tail()
                ),
                Err(StartError::Fatal(msg)) => panic!("{msg}"),
            }
        }
    }

    /// SIGSTOP the server: it keeps its sockets (connects still succeed via the backlog) but
    /// answers nothing until [`RedisServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT a paused server.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        assert!(
            self.child.is_some(),
            "redis-server on port {} is not running (killed?): cannot send {sig}",
            self.port
        );
        let status = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run `kill {sig} {}`: {e}", self.pid));
        assert!(
            status.success(),
            "`kill {sig} {}` failed: {status}",
            self.pid
        );
    }

    /// Runs one command on a fresh synchronous connection and returns the reply as text (see
    /// [`super::format_value`]); a server error reply comes back as `(error) CODE detail`.
    /// Panics if it cannot connect or the connection fails during the command (use
    /// [`RedisServer::try_cli`] for commands that may kill the connection, e.g. `DEBUG SEGFAULT`).
    pub fn cli(&self, args: &[&str]) -> String {
        match self.try_cli(args) {
            Ok(value) => super::format_value(&value),
            Err(e)
                if matches!(
                    e.kind(),
                    redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                ) =>
            {
                match (e.code(), e.detail()) {
                    (Some(code), Some(detail)) => format!("(error) {code} {detail}"),
                    (Some(code), None) => format!("(error) {code}"),
                    _ => format!("(error) {e}"),
                }
            }
            Err(e) => panic!(
                "redis command {args:?} on {} failed: {e}\nlast log lines:\n{}",
                self.url(),
                self.log_tail()
            ),
        }
    }

    /// Runs one command on a fresh synchronous connection (2 s connect timeout, 30 s response
    /// timeout) and returns the raw result; never panics on connection errors (they are `Err`).
    pub fn try_cli(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let (name, rest) = args
            .split_first()
            .expect("cli needs at least the command name");
        let mut con =
            redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut cmd = redis::cmd(name);
        for arg in rest {
            cmd.arg(*arg);
        }
        cmd.query::<redis::Value>(&mut con)
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }

    fn args(&self) -> Vec<String> {
        let dir = self.dir.display().to_string();
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
            "--protected-mode",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.cluster {
            let nodes_conf = self.dir.join("nodes.conf").display().to_string();
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &nodes_conf,
                    "--cluster-node-timeout",
                    "5000",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Spawns the process on `self.port` and waits until it answers PING as itself.
    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| {
                StartError::Fatal(format!("cannot open {}: {e}", self.log_path.display()))
            })?;
        let log_err = log
            .try_clone()
            .map_err(|e| StartError::Fatal(format!("cannot clone log file handle: {e}")))?;
        let bin = redis_server_bin();
        let child = Command::new(&bin)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    StartError::Fatal(format!(
                        "`{bin}` not found on PATH: install Redis (Debian/Ubuntu: `apt-get install -y redis-server redis-tools`) \
                         or point FUSEBOX_REDIS_SERVER_BIN at the binary"
                    ))
                } else {
                    StartError::Fatal(format!("cannot spawn `{bin}`: {e}"))
                }
            })?;
        self.pid = child.id();
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = self.url();
        let client = redis::Client::open(url.as_str())
            .map_err(|e| StartError::Fatal(format!("bad URL {url}: {e}")))?;
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => return Err(StartError::Fatal("redis-server is not running".into())),
            };
            if let Some(status) = exited {
                self.child = None;
                let tail = self.log_tail();
                if tail.contains("Address already in use")
                    || tail.contains("Failed listening on port")
                {
                    // Start the next attempt with a clean log.
                    let _ = File::create(&self.log_path);
                    return Err(StartError::PortInUse);
                }
                return Err(StartError::Fatal(format!(
                    "redis-server on port {} exited before answering PING ({status}); last log lines of {}:\n{tail}",
                    self.port,
                    self.log_path.display()
                )));
            }
            if self.answers_as_itself(&client) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(StartError::Fatal(format!(
                    "redis-server (pid {}) on port {} did not answer PING within {READY_TIMEOUT:?}; last log lines of {}:\n{}",
                    self.pid,
                    self.port,
                    self.log_path.display(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// PING answers and `INFO server` reports our pid (not some other server that won the port).
    fn answers_as_itself(&self, client: &redis::Client) -> bool {
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(250)) else {
            return false;
        };
        if con.set_read_timeout(Some(Duration::from_secs(1))).is_err() {
            return false;
        }
        if redis::cmd("PING").query::<String>(&mut con).ok().as_deref() != Some("PONG") {
            return false;
        }
        let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(&mut con) else {
            return false;
        };
        info.lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .map(|pid| pid.trim() == self.pid.to_string())
            .unwrap_or(false)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "redis-server on port {} (pid {}), last log lines of {}:\n{}",
                self.port,
                self.pid,
                self.log_path.display(),
                self.log_tail()
            );
        }
        self.kill();
        if std::env::var_os("FUSEBOX_KEEP_REDIS_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("pid", &self.pid)
            .field("running", &self.child.is_some())
            .field("dir", &self.dir)
            .finish()
    }
}

/// A port that was free on 127.0.0.1 a moment ago; with `cluster`, port + 10000 (the cluster bus)
/// was free too.
pub fn free_port(cluster: bool) -> u16 {
    for _ in 0..200 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("cannot bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("bound listener has an address")
            .port();
        if !cluster {
            return port;
        }
        let Some(bus) = port.checked_add(10000) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("could not find a free port on 127.0.0.1 (cluster bus port free too: {cluster})")
}

/// A fresh, empty directory under the system temp dir.
fn make_temp_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "fusebox-redis-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("cannot create temp dir {}: {e}", dir.display()),
        }
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log file (or why it cannot be read).
pub fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            if lines.is_empty() {
                "(log is empty)".to_string()
            } else {
                lines[start..].join("\n")
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
