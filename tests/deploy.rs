//! The deployment files: `docker-compose.yml`, `deploy/nginx.conf`, `deploy/fusebox.toml` and
//! the `Dockerfile`. No Docker engine runs here, so: the compose file is checked by
//! `docker-compose config` (its normalized output read for the topology), the nginx
//! configuration by `nginx -t`, the fleet's configuration by the crate's own parser and the
//! binary's command line, and the Dockerfile's dependency stage by cargo reading the manifest
//! it leaves behind. (The same topology runs with processes in tests/proxy_fleet.rs.)

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::nginx;
use support::tools;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn show(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `docker-compose config` with `args`, run in the repository with a known environment.
fn compose(args: &[&str]) -> Output {
    let tool = tools::docker_compose();
    tool.command()
        .current_dir(root())
        .args(["-f", "docker-compose.yml"])
        .args(args)
        .env("FUSEBOX_ADMIN_TOKEN", "test-admin-token")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", tool.describe()))
}

/// One service of the normalized compose output (`docker-compose config`: two-space indents,
/// keys sorted, lists as `- item`): its command, environment and volumes.
#[derive(Debug, Default)]
struct Service {
    image: Option<String>,
    command: Vec<String>,
    environment: BTreeMap<String, String>,
    volumes: Vec<String>,
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
        .unwrap_or(s);
    s.to_owned()
}

/// Reads the services out of the normalized output (enough of YAML for it).
fn services(normalized: &str) -> BTreeMap<String, Service> {
    let mut out: BTreeMap<String, Service> = BTreeMap::new();
    let mut in_services = false;
    let mut service: Option<String> = None;
    let mut key: Option<String> = None;
    for line in normalized.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if indent == 0 {
            in_services = text == "services:";
            service = None;
            continue;
        }
        if !in_services {
            continue;
        }
        if indent == 2 {
            let name = text.trim_end_matches(':').to_owned();
            out.entry(name.clone()).or_default();
            service = Some(name);
            key = None;
            continue;
        }
        let Some(name) = &service else { continue };
        let entry = out.entry(name.clone()).or_default();
        if indent == 4 && !text.starts_with("- ") {
            let (k, v) = text.split_once(':').unwrap_or((text, ""));
            key = Some(k.to_owned());
            let v = v.trim();
            match k {
                "image" => entry.image = Some(unquote(v)),
                // A command written as one string.
                "command" if !v.is_empty() => {
                    entry.command = v.split_whitespace().map(unquote).collect()
                }
                _ => {}
            }
            continue;
        }
        let item = text.strip_prefix("- ").map(unquote);
        match (key.as_deref(), item) {
            (Some("command"), Some(item)) => entry.command.push(item),
            (Some("volumes"), Some(item)) => entry.volumes.push(item),
            (Some("environment"), None) => {
                if let Some((k, v)) = text.split_once(':') {
                    entry.environment.insert(k.to_owned(), unquote(v));
                }
            }
            (Some("environment"), Some(item)) => {
                if let Some((k, v)) = item.split_once('=') {
                    entry.environment.insert(k.to_owned(), v.to_owned());
                }
            }
            _ => {}
        }
    }
    out
}

/// `host:port` of a URL such as `redis://redis:6379` or `http://mock-upstream:9000/`.
fn host_port(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url} has no port"));
    (host.to_owned(), port.to_owned())
}

/// The `server HOST:PORT` lines of the `upstream fusebox { ... }` block of an nginx config.
fn nginx_upstreams(config: &str) -> Vec<String> {
    let start = config
        .find("upstream fusebox {")
        .expect("deploy/nginx.conf has an `upstream fusebox { ... }` block");
    let block = &config[start..];
    let end = block.find('}').expect("the upstream block ends");
    block[..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("server "))
        .map(|l| {
            l.split(|c: char| c.is_whitespace() || c == ';')
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

#[test]
fn the_compose_file_is_valid() {
    let output = compose(&["config", "-q"]);
    assert!(
        output.status.success(),
        "docker-compose config -q rejects docker-compose.yml: {}",
        show(&output)
    );
}

#[test]
fn the_compose_fleet_is_three_replicas_behind_nginx_sharing_one_redis() {
    let output = compose(&["config"]);
    assert!(output.status.success(), "{}", show(&output));
    let services = services(&String::from_utf8_lossy(&output.stdout));
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "redis",
        "mock-upstream",
        "fusebox-1",
        "fusebox-2",
        "fusebox-3",
        "nginx",
    ]
    .into();
    assert_eq!(names, expected, "the services of docker-compose.yml");

    // The mock upstream: `fusebox mock-upstream`, listening where the replicas send requests.
    let mock = &services["mock-upstream"];
    assert_eq!(
        mock.command.first().map(String::as_str),
        Some("mock-upstream"),
        "{mock:?}"
    );
    let mock_listen = mock
        .command
        .windows(2)
        .find(|w| w[0] == "--listen")
        .map(|w| w[1].clone())
        .unwrap_or_else(|| panic!("mock-upstream has no --listen: {mock:?}"));
    let (_, mock_port) = host_port(&mock_listen);

    let redis = &services["redis"];
    assert!(
        redis
            .image
            .as_deref()
            .is_some_and(|i| i.starts_with("redis:")),
        "{redis:?}"
    );

    let mut replica_ports = BTreeSet::new();
    for name in ["fusebox-1", "fusebox-2", "fusebox-3"] {
        let replica = &services[name];
        assert_eq!(replica.command, ["serve"], "{name}: {replica:?}");
        let env = &replica.environment;
        let redis_url = env
            .get("FUSEBOX_REDIS_URL")
            .unwrap_or_else(|| panic!("{name} has no FUSEBOX_REDIS_URL: {replica:?}"));
        assert_eq!(
            host_port(redis_url),
            ("redis".to_owned(), "6379".to_owned()),
            "{name} shares the one redis service"
        );
        let upstream = env
            .get("FUSEBOX_UPSTREAM")
            .unwrap_or_else(|| panic!("{name} has no FUSEBOX_UPSTREAM: {replica:?}"));
        assert_eq!(
            host_port(upstream),
            ("mock-upstream".to_owned(), mock_port.clone()),
            "{name} calls the mock upstream where it listens"
        );
        let listen = env
            .get("FUSEBOX_LISTEN")
            .unwrap_or_else(|| panic!("{name} has no FUSEBOX_LISTEN: {replica:?}"));
        let (host, port) = host_port(listen);
        assert_eq!(
            host, "0.0.0.0",
            "{name} listens on every interface of its container"
        );
        replica_ports.insert(format!("{name}:{port}"));
        assert!(
            replica
                .volumes
                .iter()
                .any(|v| v.contains("deploy/fusebox.toml:")
                    && v.contains(
                        env.get("FUSEBOX_CONFIG")
                            .map_or("/etc/fusebox/fusebox.toml", String::as_str)
                    )),
            "{name} mounts deploy/fusebox.toml where FUSEBOX_CONFIG points: {replica:?}"
        );
        assert!(
            env.get("FUSEBOX_ADMIN_TOKEN")
                .is_some_and(|t| t == "test-admin-token"),
            "{name} takes its admin token from the environment: {replica:?}"
        );
    }

    // nginx balances over exactly the three replicas, with the configuration in the repo.
    let nginx = &services["nginx"];
    assert!(
        nginx
            .volumes
            .iter()
            .any(|v| v.contains("deploy/nginx.conf:/etc/nginx/nginx.conf")),
        "{nginx:?}"
    );
    let upstreams: BTreeSet<String> = nginx_upstreams(&nginx::deploy_config())
        .into_iter()
        .collect();
    assert_eq!(
        upstreams, replica_ports,
        "deploy/nginx.conf's upstream servers are the replicas where they listen"
    );
}

#[test]
fn the_compose_commands_are_ones_the_binary_accepts() {
    // Each fusebox service's command line, with `--help` after it: clap parses (and checks)
    // every argument before it and exits 0, or exits 2 naming the one it rejects.
    let output = compose(&["config"]);
    assert!(output.status.success(), "{}", show(&output));
    let services = services(&String::from_utf8_lossy(&output.stdout));
    let mut checked = 0;
    for (name, service) in &services {
        if !service
            .image
            .as_deref()
            .is_some_and(|i| i.starts_with("fusebox"))
        {
            continue;
        }
        let run = Command::new(env!("CARGO_BIN_EXE_fusebox"))
            .args(&service.command)
            .arg("--help")
            .envs(&service.environment)
            .stdin(Stdio::null())
            .output()
            .expect("run fusebox");
        assert!(
            run.status.success(),
            "{name}: `fusebox {}` is not a command line the binary accepts: {}",
            service.command.join(" "),
            show(&run)
        );
        checked += 1;
    }
    assert_eq!(
        checked, 4,
        "the mock upstream and three replicas run the fusebox image"
    );
}

#[test]
fn the_fleet_config_is_valid_with_the_replicas_environment() {
    // `fusebox check` on deploy/fusebox.toml, with the environment a replica gets.
    let output = compose(&["config"]);
    assert!(output.status.success(), "{}", show(&output));
    let services = services(&String::from_utf8_lossy(&output.stdout));
    let replica = &services["fusebox-1"];
    let mut env = replica.environment.clone();
    env.remove("FUSEBOX_CONFIG");
    let run = Command::new(env!("CARGO_BIN_EXE_fusebox"))
        .arg("-c")
        .arg(root().join("deploy/fusebox.toml"))
        .arg("check")
        .envs(&env)
        .stdin(Stdio::null())
        .output()
        .expect("run fusebox check");
    assert!(run.status.success(), "deploy/fusebox.toml: {}", show(&run));
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        !text.contains("test-admin-token"),
        "check prints the admin token: {text}"
    );
}

#[test]
fn the_nginx_config_passes_nginx_t() {
    let tool = tools::nginx();
    let dir = nginx::make_temp_dir("nginx-t");
    let upstreams: Vec<SocketAddr> = (1..=3)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
        .collect();
    let temp_paths = nginx::temp_path_directives(&tool, &dir);
    let config = nginx::render(&nginx::deploy_config(), 8080, &upstreams, &temp_paths, &dir);
    let conf = dir.join("nginx.conf");
    fs::write(&conf, config).expect("write nginx.conf");
    let output = tool
        .command()
        .arg("-t")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .output()
        .expect("run nginx -t");
    let log = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    let _ = fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "nginx -t rejects deploy/nginx.conf: {}\nerror.log:\n{log}",
        show(&output)
    );
}

/// Copies `Cargo.toml` and `Cargo.lock` into a fresh directory and runs the Dockerfile's stub
/// step there.
fn stubbed_manifest_dir() -> PathBuf {
    let dir = nginx::make_temp_dir("docker-stage");
    for file in ["Cargo.toml", "Cargo.lock"] {
        fs::copy(root().join(file), dir.join(file)).expect("copy the manifest");
    }
    let script = root().join("deploy/stub-targets.sh");
    let output = Command::new("sh")
        .arg(&script)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("run sh deploy/stub-targets.sh");
    assert!(
        output.status.success(),
        "stub-targets.sh: {}",
        show(&output)
    );
    dir
}

/// Whether cargo reads the manifest in `dir` with the files there: a build of a bin that does
/// not exist fails with "no bin target named" once the manifest was read (nothing is compiled).
fn cargo_reads_manifest(dir: &Path) -> Result<(), String> {
    let output = Command::new(env!("CARGO"))
        .args(["build", "--offline", "--bin", "no-such-bin-fusebox-test"])
        .arg("--target-dir")
        .arg(dir.join("target"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run cargo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("no bin target named") {
        Ok(())
    } else {
        Err(show(&output))
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create dir");
    for entry in fs::read_dir(from).expect("read dir").flatten() {
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            fs::copy(&path, &target).expect("copy file");
        }
    }
}

#[test]
fn the_dockerfile_stages_leave_a_manifest_cargo_reads() {
    let dockerfile = fs::read_to_string(root().join("Dockerfile")).expect("read Dockerfile");
    assert!(
        dockerfile.contains("COPY deploy/stub-targets.sh"),
        "the Dockerfile's dependency stage runs deploy/stub-targets.sh"
    );
    let dir = stubbed_manifest_dir();
    // Stage 1: the stubs alone.
    let stage1 = cargo_reads_manifest(&dir);
    // Stage 2: src/ replaced by the real one, as the Dockerfile copies it (the stubs of tests
    // and benches stay).
    fs::remove_dir_all(dir.join("src")).expect("remove the stub src");
    for sub in ["src", "lua"] {
        copy_dir(&root().join(sub), &dir.join(sub));
    }
    fs::copy(root().join("README.md"), dir.join("README.md")).expect("copy README.md");
    let stage2 = cargo_reads_manifest(&dir);
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = stage1 {
        panic!(
            "after the stub step cargo cannot read the manifest (a target the stubs miss?): {e}"
        );
    }
    if let Err(e) = stage2 {
        panic!("with the sources copied in, cargo cannot read the manifest: {e}");
    }
}

#[test]
fn the_dockerfile_runs_fusebox_serve_as_a_non_root_user() {
    let dockerfile = fs::read_to_string(root().join("Dockerfile")).expect("read Dockerfile");
    let stages = dockerfile
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .count();
    assert!(stages >= 2, "a multi-stage build (builder and runtime)");
    let runtime = dockerfile
        .rsplit_once("\nFROM ")
        .map(|(_, runtime)| runtime)
        .expect("a runtime stage");
    let user = runtime
        .lines()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        !["root", "0", "root:root", "0:0"].contains(&user.trim()),
        "the runtime user is not root: {user}"
    );
    assert!(
        runtime.contains(r#"ENTRYPOINT ["/usr/local/bin/fusebox"]"#)
            && runtime.contains(r#"CMD ["serve"]"#),
        "the image runs `fusebox serve`"
    );
}
