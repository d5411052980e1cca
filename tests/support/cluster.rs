//! A real Redis Cluster made of `redis-server` child processes.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::{log_tail, redis_cli_bin, RedisServer};

/// How long `redis-cli --cluster create` may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the nodes get to agree on `cluster_state:ok` after the create.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A real Redis Cluster: `masters` `redis-server --cluster-enabled yes` processes on free ports
/// (their cluster bus ports, port + 10000, were free too), joined with
/// `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`. Every node reports
/// `cluster_state:ok` with all 16384 slots assigned before [`RedisCluster::start`] returns.
/// Dropping it kills every node. Needs `redis-server` and `redis-cli` on PATH.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts and joins `masters` nodes (Redis Cluster needs at least 3). Panics with the
    /// nodes' logs / `redis-cli` output if that fails.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(
            masters >= 3,
            "a Redis Cluster needs at least 3 masters, got {masters}"
        );
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| RedisServer::start_cluster_node(&[]))
            .collect();
        let cluster = RedisCluster { nodes };
        cluster.create();
        cluster.wait_until_ok();
        cluster
    }

    /// `redis://127.0.0.1:PORT/` for each node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node processes (all masters), e.g. to `pause()` one.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The node processes, mutably, e.g. to `kill()` / `restart()` one (a restarted node keeps
    /// its `nodes.conf`, so it rejoins; call [`RedisCluster::wait_until_ok`] after).
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// `CLUSTER INFO` of node `i`, as text.
    pub fn cluster_info(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "INFO"])
    }

    /// Waits (up to 30 s) until every node answers and reports `cluster_state:ok`, 16384 slots
    /// assigned and ok, and knows all the nodes; panics with each node's `CLUSTER INFO` and log
    /// otherwise.
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        let expected_nodes = format!("cluster_known_nodes:{}", self.nodes.len());
        loop {
            let infos: Vec<Result<String, String>> = self
                .nodes
                .iter()
                .map(|node| match node.try_cli(&["CLUSTER", "INFO"]) {
                    Ok(value) => Ok(super::format_value(&value)),
                    Err(e) => Err(e.to_string()),
                })
                .collect();
            let all_ok = infos.iter().all(|info| match info {
                Ok(info) => {
                    let has = |needle: &str| info.lines().any(|line| line.trim() == needle);
                    has("cluster_state:ok")
                        && has("cluster_slots_assigned:16384")
                        && has("cluster_slots_ok:16384")
                        && has(&expected_nodes)
                }
                Err(_) => false,
            });
            if all_ok {
                return;
            }
            if Instant::now() >= deadline {
                let report: Vec<String> = self
                    .nodes
                    .iter()
                    .zip(&infos)
                    .map(|(node, info)| {
                        format!(
                            "--- node {} (pid {}):\nCLUSTER INFO: {}\nlog tail:\n{}",
                            node.port(),
                            node.pid(),
                            match info {
                                Ok(info) => info.clone(),
                                Err(e) => format!("(failed: {e})"),
                            },
                            node.log_tail()
                        )
                    })
                    .collect();
                panic!(
                    "Redis Cluster did not reach cluster_state:ok within {CONVERGE_TIMEOUT:?}\n{}",
                    report.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `redis-cli --cluster create` over all nodes, output to a log in node 0's dir.
    fn create(&self) {
        let out_path = self.nodes[0].dir().join("cluster-create.log");
        let out = File::create(&out_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", out_path.display()));
        let err = out.try_clone().expect("cannot clone log file handle");
        let bin = redis_cli_bin();
        let mut cmd = Command::new(&bin);
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port()));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run `{bin}` (needed to form a Redis Cluster; Debian/Ubuntu: \
                 `apt-get install -y redis-tools`, or set FUSEBOX_REDIS_CLI_BIN): {e}"
            )
        });
        let deadline = Instant::now() + CREATE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "`{bin} --cluster create` did not finish within {CREATE_TIMEOUT:?}; its output:\n{}",
                        log_tail(&out_path)
                    );
                }
                Err(e) => panic!("waiting for `{bin} --cluster create` failed: {e}"),
            }
        };
        assert!(
            status.success(),
            "`{bin} --cluster create` failed ({status}); its output:\n{}",
            log_tail(&out_path)
        );
    }
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("nodes", &self.nodes)
            .finish()
    }
}
