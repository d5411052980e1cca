//! Proxy benchmark: what `fusebox serve` adds to a request, against the same requests sent
//! straight to the upstream, in one run on one machine.
//!
//! ```sh
//! sudo apt-get install wrk nginx-light redis-server    # Debian / Ubuntu; once
//! cargo bench --bench proxy
//! FUSEBOX_BENCH_SECS=10 cargo bench --bench proxy      # seconds per row (default 5)
//! FUSEBOX_BENCH_WRK_THREADS=1 cargo bench --bench proxy  # wrk threads at c=64 (default 2)
//! TOKIO_WORKER_THREADS=1 cargo bench --bench proxy     # fusebox serve's threads (default: one per core)
//! ```
//!
//! The upstream is nginx answering every request with one fixed Messages API response
//! (`return 200 '...'`: no upstream work at all, so every microsecond the proxy adds shows).
//! The load generator is `wrk` (HTTP/1.1 keep-alive, a `POST /v1/messages` with a small JSON
//! body and the Anthropic headers), its latency percentiles read from its Lua `done` hook
//! (microsecond resolution). Rows, each at concurrency 1 and 64: (direct) nginx itself;
//! (embedded) through one `fusebox serve` on its in-process store; (redis) through one
//! `fusebox serve` on a `redis-server` of its own. The proxied feature has a bulkhead, a rate
//! limit and a two-model fallback chain in force (none of them refuses at this load), so the
//! figures include every shared-state decision a request makes.
//!
//! Then it counts the Redis round trips per proxied request: `MONITOR` during 200 sequential
//! requests, counting the commands clients sent (a script's own `redis.call`s are not round
//! trips), by command and script.
//!
//! It needs `wrk`, `nginx` and `redis-server` on `PATH` (or `FUSEBOX_BENCH_WRK`,
//! `FUSEBOX_BENCH_NGINX`, `FUSEBOX_REDIS_SERVER_BIN`); without them it says what to install
//! and exits with status 1. It never runs under `cargo test`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The test suites' own `redis-server` spawner.
#[allow(clippy::unwrap_used, missing_docs)]
#[path = "../tests/support/mod.rs"]
mod support;

/// The upstream's fixed answer: a realistic non-streaming Messages response.
const ANSWER: &str = r#"{"id":"msg_01Bench","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[{"type":"text","text":"Hello! How can I help you today?"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":10}}"#;

/// The request every row sends.
const REQUEST: &str = r#"{"model":"claude-sonnet-4-6","max_tokens":64,"messages":[{"role":"user","content":"Hello"}]}"#;

/// wrk's request and report: one `FUSEBOX_WRK` line, numbers only.
const WRK_SCRIPT: &str = r#"
wrk.method = "POST"
wrk.body = '__BODY__'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "sk-bench-not-a-real-key"
wrk.headers["anthropic-version"] = "2023-06-01"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "FUSEBOX_WRK requests=%d duration_us=%d p50_us=%.1f p99_us=%.1f errors=%d non2xx=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"#;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends
    }
    let secs: u64 = env_or("FUSEBOX_BENCH_SECS", 5);
    let wrk_threads: usize = env_or("FUSEBOX_BENCH_WRK_THREADS", 2);
    let wrk = std::env::var("FUSEBOX_BENCH_WRK").unwrap_or_else(|_| "wrk".into());
    let nginx = std::env::var("FUSEBOX_BENCH_NGINX").unwrap_or_else(|_| "nginx".into());
    let mut missing = Vec::new();
    if !runs(&wrk, "-v") {
        missing.push("wrk");
    }
    if !runs(&nginx, "-v") {
        missing.push("nginx (nginx-light)");
    }
    if !support::redis_server::redis_server_available() {
        missing.push("redis-server");
    }
    if !missing.is_empty() {
        eprintln!(
            "proxy bench: {} not found on PATH. On Debian/Ubuntu: \
             sudo apt-get install wrk nginx-light redis-server",
            missing.join(", ")
        );
        std::process::exit(1);
    }

    let dir = temp_dir();
    let upstream = Nginx::start(&nginx, &dir);
    let redis = support::RedisServer::start();
    let embedded = Proxy::start(&dir, "embedded", upstream.port, None);
    let shared = Proxy::start(&dir, "redis", upstream.port, Some(&redis.url()));

    let script = dir.join("post.lua");
    write(&script, &WRK_SCRIPT.replace("__BODY__", REQUEST));
    let wrk_run = |port: u16, c: usize| -> Figures {
        let threads = if c == 1 { 1 } else { wrk_threads.min(c) };
        run_wrk(&wrk, &script, port, c, threads, secs)
    };

    // `fusebox serve` takes its thread count from TOKIO_WORKER_THREADS (passed through).
    let serving = std::env::var("TOKIO_WORKER_THREADS").map_or_else(
        |_| "one per core".to_owned(),
        |v| format!("TOKIO_WORKER_THREADS={v}"),
    );
    println!(
        "fusebox proxy bench: {secs} s per row, wrk {wrk_threads} threads at c=64, nginx \
         fixed-response upstream, one fusebox serve (release; serving threads: {serving}), \
         same machine"
    );
    println!(
        "{:<30} {:>3} {:>8} {:>9} {:>9}   {:>22} {:>6}   {:>12}",
        "row", "c", "req/s", "p50", "p99", "p50 added (direct)", "ratio", "CPU µs/req"
    );
    let redis_port = redis.port();
    let mut summary = Vec::new();
    for c in [1usize, 64] {
        // Warm every path (connections to nginx and Redis, the scripts loaded).
        for port in [upstream.port, embedded.port, shared.port] {
            run_wrk(&wrk, &script, port, c, 1, 1);
        }
        let direct = wrk_run(upstream.port, c);
        print_row("direct (nginx)", c, &direct, None, "");
        for (name, proxy, store) in [
            ("fusebox serve, embedded", &embedded, None),
            ("fusebox serve, Redis", &shared, Some(redis_port)),
        ] {
            let cpu0 = (process_cpu_s(proxy.pid()), store.and_then(redis_cpu_s));
            let f = wrk_run(proxy.port, c);
            let cpu1 = (process_cpu_s(proxy.pid()), store.and_then(redis_cpu_s));
            let per = |a: Option<f64>, b: Option<f64>| {
                a.zip(b)
                    .map(|(a, b)| format!("{:.0}", (b - a) * 1e6 / f.requests.max(1.0)))
            };
            let mut cpu = format!("proxy {}", per(cpu0.0, cpu1.0).unwrap_or("?".into()));
            if let Some(r) = per(cpu0.1, cpu1.1) {
                cpu.push_str(&format!(", Redis {r}"));
            }
            print_row(name, c, &f, Some(&direct), &cpu);
            summary.push((name, c, f, direct));
        }
    }
    println!();
    for (name, c, f, d) in &summary {
        println!(
            "  {name}, c={c}: {:.0} req/s ({:.2} of direct), p50 added {:.3} ms",
            f.rps,
            f.rps / d.rps,
            (f.p50_us - d.p50_us) / 1000.0,
        );
    }
    println!(
        "  targets: >= 20,000 req/s at c=64 on Redis; p50 added <= 0.2 ms at c=1 on Redis, \
         <= 0.1 ms embedded"
    );
    println!(
        "  CPU µs/req: the fusebox serve process's CPU time (and the Redis server's) over the \
         row, per request (it grows with the machine's load too: compare rows of one run)"
    );

    round_trips(redis_port, shared.port);
    drop((embedded, shared, upstream, redis));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Figures of one wrk run.
#[derive(Clone, Copy)]
struct Figures {
    requests: f64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

fn print_row(name: &str, c: usize, f: &Figures, base: Option<&Figures>, cpu: &str) {
    let (added, ratio) = match base {
        Some(d) => (
            format!("{} ({})", us(f.p50_us - d.p50_us), us(d.p50_us)),
            format!("{:.2}", f.rps / d.rps),
        ),
        None => ("-".into(), "-".into()),
    };
    let errors = if f.errors > 0 {
        format!("  ({} errors or non-2xx!)", f.errors)
    } else {
        String::new()
    };
    println!(
        "{name:<30} {c:>3} {:>8.0} {:>9} {:>9}   {added:>22} {ratio:>6}   {cpu}{errors}",
        f.rps,
        us(f.p50_us),
        us(f.p99_us)
    );
}

fn us(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn run_wrk(wrk: &str, script: &Path, port: u16, c: usize, threads: usize, secs: u64) -> Figures {
    let out = Command::new(wrk)
        .arg(format!("-t{threads}"))
        .arg(format!("-c{c}"))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("5s")
        .arg("-s")
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/v1/messages"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {wrk}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("FUSEBOX_WRK "))
        .unwrap_or_else(|| {
            panic!(
                "wrk printed no FUSEBOX_WRK line (exit {:?}):\n{text}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("wrk line without {name}: {line}"))
    };
    let duration_s = field("duration_us") / 1e6;
    Figures {
        requests: field("requests"),
        rps: field("requests") / duration_s,
        p50_us: field("p50_us"),
        p99_us: field("p99_us"),
        errors: (field("errors") + field("non2xx")) as u64,
    }
}

/// `MONITOR` while 200 sequential requests go through the Redis-backed proxy: the commands
/// clients sent (round trips; a pipeline would count each command), by command and script.
fn round_trips(port: u16, proxy_port: u16) {
    const N: usize = 200;
    // Name the scripts: load each text fusebox may send (lua/*.lua alone, after the lib.lua
    // prelude, and the composed settle_admit) to learn its SHA-1; loading changes nothing.
    let mut names = BTreeMap::new();
    let lua = |f: &str| {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("lua").join(f))
            .unwrap_or_default()
    };
    let mut texts: Vec<(String, String)> = Vec::new();
    let lib = lua("lib.lua");
    if let Ok(entries) = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("lua")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let body = lua(&name);
            texts.push((name.clone(), format!("{lib}\n{body}")));
            texts.push((name, body));
        }
    }
    texts.push((
        "settle_admit.lua (settle + release + admit)".into(),
        format!(
            "local settle_part = function(KEYS, ARGV)\n{}\nend\nlocal release_part = \
             function(KEYS, ARGV)\n{}\nend\nlocal admit_part = function(KEYS, ARGV)\n{}\
             \nend\n{}",
            lua("settle.lua"),
            lua("release.lua"),
            lua("admit.lua"),
            lua("settle_admit.lua")
        ),
    ));
    for (name, text) in texts {
        if let Some(sha) = redis_cli(port, &["SCRIPT", "LOAD", &text]) {
            names.insert(sha.trim().to_lowercase(), name);
        }
    }

    let mut client = HttpClient::connect(proxy_port);
    for _ in 0..20 {
        client.post(); // warm: connections, scripts, the settle batcher
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = std::env::temp_dir().join(format!("fusebox-bench-monitor-{}", std::process::id()));
    let file = std::fs::File::create(&log).expect("monitor log");
    let mut monitor = Command::new(support::redis_server::redis_cli_bin())
        .args(["-p", &port.to_string(), "MONITOR"])
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-cli MONITOR");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut tiers = BTreeMap::<String, usize>::new();
    for _ in 0..N {
        let tier = client.post();
        *tiers.entry(tier).or_default() += 1;
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(300)); // let queued settles go out
    let _ = monitor.kill();
    let _ = monitor.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);

    let mut by_command = BTreeMap::<String, usize>::new();
    let mut total = 0usize;
    for line in text.lines() {
        // 1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" "sha" ...
        let Some(rest) = line.split_once(" [").map(|(_, r)| r) else {
            continue;
        };
        let Some((who, args)) = rest.split_once("] ") else {
            continue;
        };
        if who.ends_with(" lua") {
            continue; // a script's own call, not a round trip
        }
        let mut words = args.split('"').filter(|w| !w.trim().is_empty());
        let command = words.next().unwrap_or("?").to_ascii_uppercase();
        let label = if command.starts_with("EVALSHA") {
            let sha = words.next().unwrap_or("?").to_lowercase();
            let name = names
                .get(&sha)
                .cloned()
                .unwrap_or_else(|| format!("script {}", &sha[..sha.len().min(8)]));
            format!("{command} {name}")
        } else {
            command
        };
        *by_command.entry(label).or_default() += 1;
        total += 1;
    }
    println!();
    println!(
        "Redis round trips per proxied request (MONITOR, {N} sequential requests in {:.0} ms, \
         answered by tier {tiers:?}; everything the proxy sent in that time, background \
         work included): {:.2}",
        took.as_secs_f64() * 1000.0,
        total as f64 / N as f64
    );
    for (label, n) in &by_command {
        println!("    {label}: {n} ({:.2} per request)", *n as f64 / N as f64);
    }
}

/// A minimal keep-alive HTTP/1.1 client for the sequential round-trip count.
struct HttpClient {
    stream: TcpStream,
    port: u16,
}

impl HttpClient {
    fn connect(port: u16) -> HttpClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        HttpClient { stream, port }
    }

    /// Sends the bench request; returns the `x-fusebox-tier` header (or `?`). Panics on
    /// anything but a 200.
    fn post(&mut self) -> String {
        let request = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1:{}\r\ncontent-type: application/json\r\n\
             x-api-key: sk-bench-not-a-real-key\r\nanthropic-version: 2023-06-01\r\n\
             content-length: {}\r\n\r\n{REQUEST}",
            self.port,
            REQUEST.len()
        );
        self.stream
            .write_all(request.as_bytes())
            .expect("write request");
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.stream.read(&mut chunk).expect("read response");
            assert!(n > 0, "the proxy closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "the proxy answered {head}"
        );
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("a content-length (the bench's answers are not chunked)");
        while buf.len() < head_end + length {
            let n = self.stream.read(&mut chunk).expect("read body");
            assert!(n > 0, "the proxy closed the connection mid-body");
            buf.extend_from_slice(&chunk[..n]);
        }
        header("x-fusebox-tier").unwrap_or_else(|| "?".into())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// nginx answering every request with [`ANSWER`]: one process (`master_process off`), so
/// that killing it leaves no worker behind (a killed master's workers would live on).
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn start(bin: &str, dir: &Path) -> Nginx {
        let port = free_port();
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
        let conf = prefix.join("nginx.conf");
        write(
            &conf,
            &format!(
                "master_process off;\n\
                 worker_processes 1;\n\
                 error_log {p}/logs/error.log;\n\
                 pid {p}/nginx.pid;\n\
                 daemon off;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n\
                   access_log off;\n\
                   client_body_temp_path {p}/body;\n\
                   keepalive_requests 100000000;\n\
                   keepalive_timeout 300s;\n\
                   server {{\n\
                     listen 127.0.0.1:{port};\n\
                     location / {{ default_type application/json; return 200 '{ANSWER}'; }}\n\
                   }}\n\
                 }}\n",
                p = prefix.display()
            ),
        );
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&prefix)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        wait_for_port(port, "nginx");
        Nginx { child, port }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `fusebox serve` process.
struct Proxy {
    child: Child,
    port: u16,
}

impl Proxy {
    fn start(dir: &Path, name: &str, upstream_port: u16, redis: Option<&str>) -> Proxy {
        let port = free_port();
        let mut config = String::new();
        let _ = write!(
            config,
            "namespace = \"bench-{name}\"\n\n\
             [server]\n\
             listen = \"127.0.0.1:{port}\"\n\
             upstream = \"http://127.0.0.1:{upstream_port}\"\n\
             default_feature = \"chat\"\n\n\
             [features.chat]\n\
             max_concurrent = 1000\n\
             rate = {{ requests = 1000000, per = \"1s\", burst = 100000 }}\n\
             chain = [\"claude-sonnet-4-6\", \"claude-haiku-4-5\"]\n"
        );
        if let Some(url) = redis {
            let _ = write!(config, "\n[redis]\nurl = \"{url}\"\n");
        }
        let path = dir.join(format!("fusebox-{name}.toml"));
        write(&path, &config);
        let log = std::fs::File::create(dir.join(format!("fusebox-{name}.log"))).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_fusebox"))
            .arg("serve")
            .arg("-c")
            .arg(&path)
            .env_remove("FUSEBOX_LISTEN")
            .env_remove("FUSEBOX_UPSTREAM")
            .env_remove("FUSEBOX_REDIS_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting fusebox serve");
        wait_for_port(port, "fusebox serve");
        Proxy { child, port }
    }
}

impl Proxy {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on 127.0.0.1:{port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusebox-proxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// `redis-cli -p PORT ARGS...`'s output, if it ran.
fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new(support::redis_server::redis_cli_bin())
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Redis server's CPU seconds so far (user + system, `INFO cpu`).
fn redis_cpu_s(port: u16) -> Option<f64> {
    let info = redis_cli(port, &["INFO", "cpu"])?;
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// A process's CPU seconds so far (user + system, from `/proc/PID/stat`; Linux only).
fn process_cpu_s(pid: u32) -> Option<f64> {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

fn runs(bin: &str, arg: &str) -> bool {
    Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
