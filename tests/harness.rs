//! Tests of the test harness itself (`tests/support`): real `redis-server` processes, faults
//! (kill/restart, SIGSTOP/SIGCONT) and a real 3-master Redis Cluster.

mod support;

use std::time::{Duration, Instant};

use support::{RedisCluster, RedisServer};

fn connect(url: &str, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(url)?.get_connection_with_timeout(timeout)
}

fn ping(con: &mut redis::Connection) -> redis::RedisResult<String> {
    redis::cmd("PING").query::<String>(con)
}

/// PING on a fresh connection, with `timeout` for the connect and for the reply.
fn ping_url(url: &str, timeout: Duration) -> redis::RedisResult<String> {
    let mut con = connect(url, timeout)?;
    con.set_read_timeout(Some(timeout))?;
    ping(&mut con)
}

#[test]
fn server_starts_and_answers() {
    let server = RedisServer::start();
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );
    assert_eq!(
        ping_url(&server.url(), Duration::from_secs(2)).expect("PING"),
        "PONG"
    );
    assert_eq!(server.cli(&["SET", "harness:k", "v"]), "OK");
    assert_eq!(server.cli(&["GET", "harness:k"]), "v");
    assert_eq!(server.cli(&["GET", "harness:missing"]), "(nil)");
    assert_eq!(server.cli(&["INCRBY", "harness:n", "5"]), "5");
    assert!(
        server.cli(&["NOSUCHCOMMAND"]).starts_with("(error) "),
        "a server error comes back as text"
    );
    let info = server.cli(&["INFO", "server"]);
    assert!(
        info.contains(&format!("process_id:{}", server.pid())),
        "INFO server names our pid {}:\n{info}",
        server.pid()
    );
    // The spawn arguments took effect.
    assert!(server.cli(&["CONFIG", "GET", "save"]).ends_with("save\n"));
    assert_eq!(
        server.cli(&["CONFIG", "GET", "appendonly"]),
        "appendonly\nno"
    );
}

#[test]
fn extra_args_are_passed() {
    let server = RedisServer::start_with_args(&["--maxmemory", "7mb"]);
    assert_eq!(
        server.cli(&["CONFIG", "GET", "maxmemory"]),
        format!("maxmemory\n{}", 7 * 1024 * 1024)
    );
}

#[test]
fn two_servers_get_different_ports() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.pid(), b.pid());
}

#[test]
fn kill_and_restart_on_the_same_port() {
    let mut server = RedisServer::start();
    let port = server.port();
    let old_pid = server.pid();
    assert_eq!(server.cli(&["SET", "harness:k", "v"]), "OK");

    server.kill();
    server.kill(); // idempotent
    assert!(!server.is_running());
    assert!(
        ping_url(&server.url(), Duration::from_millis(500)).is_err(),
        "a killed server does not answer"
    );
    assert!(server.try_cli(&["PING"]).is_err());

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port, "restart keeps the port");
    assert_ne!(server.pid(), old_pid, "restart starts a new process");
    assert_eq!(
        ping_url(&server.url(), Duration::from_secs(2)).expect("PING after restart"),
        "PONG"
    );
    // --save "" and no AOF: a restarted server starts empty.
    assert_eq!(server.cli(&["GET", "harness:k"]), "(nil)");

    // Restarting a running server works too.
    let pid = server.pid();
    server.restart();
    assert_ne!(server.pid(), pid);
    assert_eq!(server.cli(&["PING"]), "PONG");
}

#[test]
fn pause_makes_pings_time_out_and_resume_recovers() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(200);
    let mut con = connect(&server.url(), Duration::from_secs(2)).expect("connect");
    con.set_read_timeout(Some(timeout)).expect("set timeout");
    assert_eq!(ping(&mut con).expect("PING before pause"), "PONG");

    server.pause();
    let started = Instant::now();
    let err = ping(&mut con).expect_err("PING to a paused server must fail");
    assert!(
        err.is_timeout() || err.is_io_error(),
        "expected a timeout, got {err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the timeout bounded it"
    );
    assert!(
        ping_url(&server.url(), timeout).is_err(),
        "a fresh connection gets no answer either"
    );

    server.resume();
    assert_eq!(
        ping_url(&server.url(), Duration::from_secs(2)).expect("PING after resume"),
        "PONG"
    );
}

#[test]
fn redis_gives_a_working_redis() {
    let redis = support::redis();
    let mut con = redis.connection();
    assert_eq!(ping(&mut con).expect("PING"), "PONG");
    let key = support::unique_name("harness");
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("1")
        .arg("EX")
        .arg(60)
        .query(&mut con)
        .expect("SET");
    let got: String = redis::cmd("GET").arg(&key).query(&mut con).expect("GET");
    assert_eq!(got, "1", "on {}", redis.describe());
}

#[test]
fn three_master_cluster_serves_all_slots() {
    let cluster = RedisCluster::start(3);
    assert_eq!(cluster.nodes().len(), 3);
    assert_eq!(cluster.urls().len(), 3);
    for (i, node) in cluster.nodes().iter().enumerate() {
        let info = cluster.cluster_info(i);
        assert!(
            info.contains("cluster_state:ok"),
            "node {}: {info}",
            node.port()
        );
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    }

    let client = redis::cluster::ClusterClient::builder(cluster.urls())
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2))
        .build()
        .expect("cluster client");
    let mut con = client.get_connection().expect("cluster connection");
    let keys: Vec<String> = (0..30).map(|i| format!("harness:cluster:{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let () = redis::cmd("SET")
            .arg(key)
            .arg(i)
            .query(&mut con)
            .expect("SET via cluster");
    }
    for (i, key) in keys.iter().enumerate() {
        let got: usize = redis::cmd("GET")
            .arg(key)
            .query(&mut con)
            .expect("GET via cluster");
        assert_eq!(got, i);
    }

    // The keys hash to different slots, owned by different masters: every node holds some.
    let slots: std::collections::BTreeSet<String> = keys
        .iter()
        .map(|key| cluster.nodes()[0].cli(&["CLUSTER", "KEYSLOT", key]))
        .collect();
    assert!(slots.len() > 3, "keys spread over slots: {slots:?}");
    let mut total = 0;
    for node in cluster.nodes() {
        let n: usize = node.cli(&["DBSIZE"]).parse().expect("DBSIZE is a number");
        assert!(n > 0, "node {} holds none of the keys", node.port());
        total += n;
    }
    assert_eq!(total, keys.len());
}

#[test]
fn format_value_is_readable() {
    use redis::Value;
    assert_eq!(support::format_value(&Value::Okay), "OK");
    assert_eq!(support::format_value(&Value::Nil), "(nil)");
    assert_eq!(support::format_value(&Value::Int(-3)), "-3");
    assert_eq!(
        support::format_value(&Value::Array(vec![
            Value::BulkString(b"a".to_vec()),
            Value::Int(1)
        ])),
        "a\n1"
    );
}
