//! A real nginx in front of fusebox processes on loopback: the load balancer of
//! docker-compose.yml (`deploy/nginx.conf`) with the compose file's addresses swapped for
//! loopback ones, so the fleet test runs the configuration users deploy.

use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::redis_server::{free_port, log_tail};
use super::tools::{self, Tool};

/// How long nginx gets to accept connections after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping nginx gets before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The compose file's nginx configuration (the template).
pub fn deploy_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx.conf");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The directives that move nginx's temp directories (one per module compiled in, as
/// `nginx -V` lists their default paths) into `dir`, so that nginx writes nothing outside it
/// and runs as a user who cannot write to `/var/lib/nginx`.
pub fn temp_path_directives(nginx: &Tool, dir: &Path) -> String {
    let output = nginx
        .command()
        .arg("-V")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{} -V`: {e}", nginx.describe()));
    // nginx -V prints to stderr.
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    let mut directives = String::new();
    for word in text.split_whitespace() {
        let Some(option) = word.strip_prefix("--http-") else {
            continue;
        };
        let Some((name, _default)) = option.split_once('=') else {
            continue;
        };
        if !name.ends_with("-temp-path") {
            continue;
        }
        let directive = name.replace('-', "_");
        let sub = directive.trim_end_matches("_temp_path");
        directives.push_str(&format!(
            "    {directive} {};\n",
            dir.join(format!("tmp-{sub}")).display()
        ));
    }
    directives
}

/// `deploy/nginx.conf` made to run as a test's process: `listen 8080` becomes
/// `127.0.0.1:listen`, the `server fusebox-N:8080` lines become `upstreams` (as many as the
/// template has, in order), the pid file and temp directories go into `dir`. Panics when the
/// template no longer has the lines it swaps (keep them as written, or change this too).
pub fn render(
    template: &str,
    listen: u16,
    upstreams: &[SocketAddr],
    temp_paths: &str,
    dir: &Path,
) -> String {
    // Occurrences outside comments.
    let count = |needle: &str| {
        template
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.matches(needle).count())
            .sum::<usize>()
    };
    assert!(
        !template.contains("\npid ") && !template.starts_with("pid "),
        "deploy/nginx.conf sets a pid file: the test puts it in its temp dir"
    );
    assert_eq!(
        count("listen 8080;"),
        1,
        "deploy/nginx.conf should have one `listen 8080;`"
    );
    let mut text = template.replace("listen 8080;", &format!("listen 127.0.0.1:{listen};"));
    let servers = count("server fusebox-");
    assert_eq!(
        servers,
        upstreams.len(),
        "deploy/nginx.conf names {servers} replicas (`server fusebox-N:8080`), the test started {}",
        upstreams.len()
    );
    for (i, addr) in upstreams.iter().enumerate() {
        let name = format!("server fusebox-{}:8080", i + 1);
        assert_eq!(
            count(&name),
            1,
            "deploy/nginx.conf should have one `{name}`"
        );
        text = text.replace(&name, &format!("server {addr}"));
    }
    assert_eq!(
        count("http {"),
        1,
        "deploy/nginx.conf should have one `http {{`"
    );
    text = text.replace("http {", &format!("http {{\n{temp_paths}"));
    format!("pid {};\n{text}", dir.join("nginx.pid").display())
}

/// An nginx process (master and worker) on a free 127.0.0.1 port, balancing over the given
/// upstreams with `deploy/nginx.conf`; stopped on drop.
pub struct Nginx {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    tool: Tool,
}

impl Nginx {
    /// Starts nginx in front of `upstreams` (as many as `deploy/nginx.conf` has replicas) and
    /// waits until it accepts connections. Panics with its error log when it does not.
    pub fn start(upstreams: &[SocketAddr]) -> Nginx {
        let tool = tools::nginx();
        let dir = make_temp_dir("nginx");
        let temp_paths = temp_path_directives(&tool, &dir);
        let template = deploy_config();
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port(false);
            let config = render(&template, port, upstreams, &temp_paths, &dir);
            let conf_path = dir.join("nginx.conf");
            fs::write(&conf_path, config)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf_path.display()));
            let error_log = dir.join("error.log");
            let _ = fs::remove_file(&error_log);
            let child = tool
                .command()
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(&error_log)
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn `{}`: {e}", tool.describe()));
            let mut nginx = Nginx {
                child: Some(child),
                port,
                dir: dir.clone(),
                tool: tool.clone(),
            };
            match nginx.wait_ready() {
                Ok(()) => return nginx,
                Err(tail) => {
                    let port_taken = tail.contains("Address already in use");
                    nginx.stop();
                    // Keep the directory for the next try.
                    nginx.dir = PathBuf::new();
                    last_error = tail;
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        panic!("nginx did not start; its error log:\n{last_error}")
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("(exited: {status})\n{}", self.error_log()));
                }
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "(no connection within {READY_TIMEOUT:?})\n{}",
                    self.error_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The last lines of nginx's error log.
    pub fn error_log(&self) -> String {
        log_tail(&self.dir.join("error.log"))
    }

    /// Stops nginx: SIGTERM to the master (which stops its worker), SIGKILL if it is still
    /// there after a while. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The nginx in use, for messages.
    pub fn tool(&self) -> &Tool {
        &self.tool
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "nginx on port {}, last lines of its error log:\n{}",
                self.port,
                self.error_log()
            );
        }
        self.stop();
        if !self.dir.as_os_str().is_empty() && std::env::var_os("FUSEBOX_KEEP_REDIS_DIRS").is_none()
        {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A fresh, empty directory under the system temp dir, `fusebox-{tag}-...`.
pub fn make_temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "fusebox-{tag}-{}-{}-{nanos}",
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
