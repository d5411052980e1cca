//! Redis in a Docker container via testcontainers (crate feature `testcontainers`).
//!
//! Selected by [`super::redis()`] when neither `REDIS_URL` nor a local `redis-server` is
//! available and a Docker engine answers, or forced with
//!
//! ```text
//! FUSEBOX_TEST_REDIS=testcontainers cargo test --features testcontainers
//! ```
//!
//! The Docker engine is found the way testcontainers finds it (`DOCKER_HOST`, else
//! `/var/run/docker.sock` or a rootless socket); [`docker_answers`] pings it first.
//!
//! The crate's optional `testcontainers` dependency does not enable the `blocking` feature, so
//! this uses testcontainers' `AsyncRunner` on a small tokio runtime of its own, on a helper
//! thread: that works the same from plain `#[test]`s and from inside `#[tokio::test]`s (where
//! blocking on another runtime directly would panic).

use std::io::{Read, Write};
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage};

/// The image used for the container.
pub const IMAGE: (&str, &str) = ("redis", "7.2");

/// A `redis:7.2` container with port 6379 published on the host; removed on drop.
pub struct RedisContainer {
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
    // Boxed: it is large, and `TestRedis` holds this inline.
    container: Option<Box<ContainerAsync<GenericImage>>>,
}

impl RedisContainer {
    /// Starts the container and waits for "Ready to accept connections". Panics with the
    /// testcontainers error (e.g. no Docker engine, image pull failed) if that fails.
    pub fn start() -> RedisContainer {
        let started = std::thread::spawn(|| -> Result<RedisContainer, String> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("fusebox-test-containers")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot build a tokio runtime: {e}"))?;
            let (container, url) = runtime.block_on(async {
                let container = GenericImage::new(IMAGE.0, IMAGE.1)
                    .with_exposed_port(6379.tcp())
                    .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
                    .start()
                    .await
                    .map_err(|e| {
                        format!("cannot start a {}:{} container: {e}", IMAGE.0, IMAGE.1)
                    })?;
                let host = container
                    .get_host()
                    .await
                    .map_err(|e| format!("cannot get the container's host: {e}"))?;
                let port = container
                    .get_host_port_ipv4(6379.tcp())
                    .await
                    .map_err(|e| format!("cannot get the container's published port: {e}"))?;
                Ok::<_, String>((container, format!("redis://{host}:{port}/")))
            })?;
            Ok(RedisContainer {
                url,
                runtime: Some(runtime),
                container: Some(Box::new(container)),
            })
        })
        .join();
        match started {
            Ok(Ok(container)) => container,
            Ok(Err(msg)) => panic!(
                "{msg}\n(testcontainers needs a running Docker engine; set DOCKER_HOST if it is not at /var/run/docker.sock)"
            ),
            Err(_) => panic!("the thread starting the Redis container panicked"),
        }
    }

    /// `redis://HOST:PORT/` of the published port.
    pub fn url(&self) -> String {
        self.url.clone()
    }
}

impl Drop for RedisContainer {
    fn drop(&mut self) {
        let (Some(runtime), Some(container)) = (self.runtime.take(), self.container.take()) else {
            return;
        };
        // On a thread of its own: blocking on (and dropping) a runtime panics inside another one.
        let removed = std::thread::spawn(move || {
            let _ = runtime.block_on((*container).rm());
            runtime.shutdown_timeout(Duration::from_secs(5));
        })
        .join();
        if removed.is_err() {
            eprintln!("removing the Redis container at {} panicked", self.url);
        }
    }
}

/// Whether a Docker engine answers `GET /_ping` at `DOCKER_HOST` (unix:// or tcp://) or at the
/// default sockets (`/var/run/docker.sock`, `$XDG_RUNTIME_DIR/.docker/run/docker.sock`,
/// `$HOME/.docker/run/docker.sock`, `$HOME/.docker/desktop/docker.sock`). Other schemes and TLS
/// endpoints (`DOCKER_TLS_VERIFY`) are assumed to answer (testcontainers will tell if not).
pub fn docker_answers() -> bool {
    let timeout = Duration::from_secs(2);
    let request = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
    let hosts: Vec<String> = match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => vec![host],
        _ => {
            let mut socks = vec!["/var/run/docker.sock".to_string()];
            if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
                socks.push(format!("{}/.docker/run/docker.sock", dir.to_string_lossy()));
            }
            if let Some(home) = std::env::var_os("HOME") {
                let home = home.to_string_lossy();
                socks.push(format!("{home}/.docker/run/docker.sock"));
                socks.push(format!("{home}/.docker/desktop/docker.sock"));
            }
            socks.into_iter().map(|s| format!("unix://{s}")).collect()
        }
    };
    hosts.iter().any(|host| {
        if let Some(path) = host.strip_prefix("unix://") {
            let Ok(mut stream) = std::os::unix::net::UnixStream::connect(path) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(timeout));
            let _ = stream.set_write_timeout(Some(timeout));
            ping(&mut stream, request)
        } else if std::env::var_os("DOCKER_TLS_VERIFY").is_some_and(|v| !v.is_empty()) {
            // A TLS endpoint: a plain HTTP ping proves nothing; let testcontainers try.
            true
        } else if let Some(addr) = host.strip_prefix("tcp://") {
            use std::net::ToSocketAddrs;
            let Some(addr) = addr
                .trim_end_matches('/')
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
            else {
                return false;
            };
            let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(timeout));
            let _ = stream.set_write_timeout(Some(timeout));
            ping(&mut stream, request)
        } else {
            true
        }
    })
}

fn ping(stream: &mut (impl Read + Write), request: &[u8]) -> bool {
    if stream.write_all(request).is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.take(4096).read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    response.starts_with("HTTP/") && response.contains(" 200 ")
}
