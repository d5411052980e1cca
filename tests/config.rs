//! Configuration: defaults validate, every bad value is refused with the dotted path of its
//! field, TOML files parse into exactly the structs they describe, and nothing panics.

use std::collections::BTreeMap;
use std::time::Duration;

use fusebox::{
    BreakerConfig, BreakerOverrides, Config, Error, FeatureConfig, RateConfig, RedisConfig,
    StorePolicy, TargetConfig,
};

/// A valid config that uses every section, for the invalid cases to break one field of.
fn full() -> Config {
    let mut c = Config {
        namespace: "checkout".to_owned(),
        redis: Some(RedisConfig {
            url: Some("redis://127.0.0.1:6379/0".to_owned()),
            ..RedisConfig::default()
        }),
        ..Config::default()
    };
    c.targets
        .insert("gpt-4o".to_owned(), BreakerConfig::default().into());
    c.features.insert(
        "chat".to_owned(),
        FeatureConfig {
            max_concurrent: Some(100),
            rate: Some(RateConfig {
                requests: 600,
                per: Duration::from_secs(60),
                burst: Some(20),
            }),
            ..FeatureConfig::default()
        },
    );
    c
}

/// The `field` of a config error, or a panic saying what came back instead.
fn refused_field(c: &Config) -> String {
    match c.validate() {
        Err(Error::Config { field, reason }) => {
            assert!(!reason.is_empty(), "{field}: the reason is empty");
            field
        }
        Err(other) => panic!("expected Error::Config, got {other:?}"),
        Ok(()) => panic!("expected the config to be refused, it validated: {c:#?}"),
    }
}

fn from_toml_field(text: &str) -> (String, String) {
    match Config::from_toml(text) {
        Err(Error::Config { field, reason }) => (field, reason),
        Err(other) => panic!("expected Error::Config, got {other:?}"),
        Ok(c) => panic!("expected {text:?} to be refused, it parsed: {c:#?}"),
    }
}

fn breaker(f: impl FnOnce(&mut BreakerConfig)) -> Config {
    let mut c = full();
    f(&mut c.breaker);
    c
}

/// `full()` with the target's breaker changed by `f` (every field set on the target).
fn target(f: impl FnOnce(&mut BreakerConfig)) -> Config {
    let mut c = full();
    let mut b = c.breaker_for("gpt-4o");
    f(&mut b);
    c.targets.insert("gpt-4o".to_owned(), b.into());
    c
}

fn feature(f: impl FnOnce(&mut FeatureConfig)) -> Config {
    let mut c = full();
    f(c.features.get_mut("chat").expect("feature in full()"));
    c
}

fn rate(f: impl FnOnce(&mut RateConfig)) -> Config {
    feature(|fc| f(fc.rate.as_mut().expect("rate in full()")))
}

fn redis(f: impl FnOnce(&mut RedisConfig)) -> Config {
    let mut c = full();
    f(c.redis.as_mut().expect("redis in full()"));
    c
}

/// Asserts each config is refused naming exactly its field.
fn assert_all_refused(cases: Vec<(&str, Config)>) {
    let mut wrong = Vec::new();
    for (expected, config) in cases {
        let got = refused_field(&config);
        if got != expected {
            wrong.push(format!("expected field {expected:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

#[test]
fn defaults_validate() {
    Config::default().validate().expect("Config::default()");
    full()
        .validate()
        .expect("full(): every section with defaults");
    assert_eq!(
        Config::from_toml("").expect("an empty file"),
        Config::default()
    );
}

#[test]
fn documented_edges_are_accepted() {
    let cases = vec![
        breaker(|b| b.failure_rate = Some(100.0)),
        breaker(|b| b.open_duration_multiplier = 1.0),
        breaker(|b| b.open_duration_multiplier = 100.0),
        breaker(|b| b.max_open_duration = b.open_duration),
        breaker(|b| {
            b.window = SEC;
            b.window_buckets = 60;
        }),
        breaker(|b| {
            b.consecutive_failures = None;
            b.failure_rate = None;
            b.slow_call_duration = Some(MS);
            b.slow_call_rate = 100.0;
        }),
        breaker(|b| b.half_open_probes = 1000),
        feature(|f| f.lease = 100 * MS),
        feature(|f| f.max_wait = Duration::ZERO),
        feature(|f| f.max_concurrent = Some(1_000_000)),
        rate(|r| {
            r.requests = 1_000;
            r.per = MS; // exactly one per µs
        }),
        redis(|r| {
            r.url = None;
            r.cluster = vec!["redis://a:7000".into(), "redis://b:7001".into()];
        }),
        redis(|r| r.url = Some("rediss://user:pw@redis.example:6380/3".into())),
    ];
    for c in cases {
        if let Err(e) = c.validate() {
            panic!("refused {e}: {c:#?}");
        }
    }
}

#[test]
fn zero_and_absurd_breaker_values_name_their_field() {
    assert_all_refused(vec![
        (
            "breaker.consecutive_failures",
            breaker(|b| b.consecutive_failures = Some(0)),
        ),
        (
            "breaker.consecutive_failures",
            breaker(|b| b.consecutive_failures = Some(u32::MAX)),
        ),
        (
            "breaker.failure_rate",
            breaker(|b| b.failure_rate = Some(0.0)),
        ),
        (
            "breaker.failure_rate",
            breaker(|b| b.failure_rate = Some(-5.0)),
        ),
        (
            "breaker.failure_rate",
            breaker(|b| b.failure_rate = Some(100.01)),
        ),
        (
            "breaker.failure_rate",
            breaker(|b| b.failure_rate = Some(1e308)),
        ),
        (
            "breaker.failure_rate",
            breaker(|b| b.failure_rate = Some(f64::NAN)),
        ),
        (
            "breaker.failure_rate",
            breaker(|b| b.failure_rate = Some(f64::INFINITY)),
        ),
        ("breaker.minimum_calls", breaker(|b| b.minimum_calls = 0)),
        (
            "breaker.minimum_calls",
            breaker(|b| b.minimum_calls = u32::MAX),
        ),
        ("breaker.window", breaker(|b| b.window = Duration::ZERO)),
        ("breaker.window", breaker(|b| b.window = 999 * MS)),
        ("breaker.window", breaker(|b| b.window = 3601 * SEC)),
        ("breaker.window", breaker(|b| b.window = Duration::MAX)),
        ("breaker.window_buckets", breaker(|b| b.window_buckets = 0)),
        ("breaker.window_buckets", breaker(|b| b.window_buckets = 61)),
        (
            "breaker.window_buckets",
            breaker(|b| b.window_buckets = u32::MAX),
        ),
        (
            "breaker.slow_call_duration",
            breaker(|b| b.slow_call_duration = Some(Duration::ZERO)),
        ),
        (
            "breaker.slow_call_duration",
            breaker(|b| b.slow_call_duration = Some(3601 * SEC)),
        ),
        (
            "breaker.slow_call_rate",
            breaker(|b| {
                b.slow_call_duration = Some(SEC);
                b.slow_call_rate = 0.0;
            }),
        ),
        (
            "breaker.slow_call_rate",
            breaker(|b| {
                b.slow_call_duration = Some(SEC);
                b.slow_call_rate = f64::NAN;
            }),
        ),
        (
            "breaker.open_duration",
            breaker(|b| b.open_duration = Duration::ZERO),
        ),
        (
            "breaker.open_duration",
            breaker(|b| b.open_duration = 86_401 * SEC),
        ),
        (
            "breaker.open_duration_multiplier",
            breaker(|b| b.open_duration_multiplier = 0.99),
        ),
        (
            "breaker.open_duration_multiplier",
            breaker(|b| b.open_duration_multiplier = 0.0),
        ),
        (
            "breaker.open_duration_multiplier",
            breaker(|b| b.open_duration_multiplier = -2.0),
        ),
        (
            "breaker.open_duration_multiplier",
            breaker(|b| b.open_duration_multiplier = 100.5),
        ),
        (
            "breaker.open_duration_multiplier",
            breaker(|b| b.open_duration_multiplier = f64::NAN),
        ),
        (
            "breaker.open_duration_multiplier",
            breaker(|b| b.open_duration_multiplier = f64::INFINITY),
        ),
        (
            "breaker.max_open_duration",
            breaker(|b| {
                b.open_duration = 60 * SEC;
                b.max_open_duration = 59 * SEC;
            }),
        ),
        (
            "breaker.max_open_duration",
            breaker(|b| b.max_open_duration = 86_401 * SEC),
        ),
        (
            "breaker.half_open_probes",
            breaker(|b| b.half_open_probes = 0),
        ),
        (
            "breaker.half_open_probes",
            breaker(|b| b.half_open_probes = 1001),
        ),
        (
            "breaker.half_open_successes",
            breaker(|b| b.half_open_successes = 0),
        ),
        (
            "breaker.half_open_successes",
            breaker(|b| b.half_open_successes = u32::MAX),
        ),
        (
            "breaker.probe_timeout",
            breaker(|b| b.probe_timeout = Duration::ZERO),
        ),
        (
            "breaker.probe_timeout",
            breaker(|b| b.probe_timeout = 3601 * SEC),
        ),
        (
            "breaker",
            breaker(|b| {
                b.consecutive_failures = None;
                b.failure_rate = None;
                b.slow_call_duration = None;
            }),
        ),
        (
            "targets.gpt-4o.breaker.half_open_probes",
            target(|b| b.half_open_probes = 0),
        ),
        (
            "targets.gpt-4o.breaker.window",
            target(|b| b.window = Duration::ZERO),
        ),
        (
            "targets.gpt-4o.breaker",
            target(|b| {
                b.consecutive_failures = None;
                b.failure_rate = None;
            }),
        ),
    ]);
}

#[test]
fn bad_feature_values_name_their_field() {
    assert_all_refused(vec![
        (
            "features.chat.max_concurrent",
            feature(|f| f.max_concurrent = Some(0)),
        ),
        (
            "features.chat.max_concurrent",
            feature(|f| f.max_concurrent = Some(u32::MAX)),
        ),
        ("features.chat.lease", feature(|f| f.lease = 99 * MS)),
        ("features.chat.lease", feature(|f| f.lease = Duration::ZERO)),
        ("features.chat.lease", feature(|f| f.lease = 86_401 * SEC)),
        (
            "features.chat.max_wait",
            feature(|f| f.max_wait = 601 * SEC),
        ),
        ("features.chat.rate.requests", rate(|r| r.requests = 0)),
        (
            "features.chat.rate.requests",
            rate(|r| r.requests = u32::MAX),
        ),
        ("features.chat.rate.per", rate(|r| r.per = Duration::ZERO)),
        ("features.chat.rate.per", rate(|r| r.per = 86_401 * SEC)),
        (
            "features.chat.rate",
            rate(|r| {
                r.requests = 1_001;
                r.per = MS; // more than one request per µs
            }),
        ),
        ("features.chat.rate.burst", rate(|r| r.burst = Some(0))),
        (
            "features.chat.rate.burst",
            rate(|r| r.burst = Some(u32::MAX)),
        ),
    ]);
}

#[test]
fn bad_names_name_their_field() {
    let with_target = |name: &str| {
        let mut c = full();
        c.targets
            .insert(name.to_owned(), BreakerConfig::default().into());
        c
    };
    let with_feature = |name: &str| {
        let mut c = full();
        c.features.insert(name.to_owned(), FeatureConfig::default());
        c
    };
    let with_namespace = |ns: &str| Config {
        namespace: ns.to_owned(),
        ..full()
    };
    assert_all_refused(vec![
        ("namespace", with_namespace("")),
        ("namespace", with_namespace("my app")),
        ("namespace", with_namespace("app{x}")),
        ("namespace", with_namespace(&"n".repeat(201))),
        ("namespace", with_namespace("caf\u{e9}")),
        // `:` ends the namespace inside a key (`fusebox:{<ns>:t:<target>}`), so `a:t` + `m`
        // could otherwise share keys with `a` + `t:m`.
        ("namespace", with_namespace("team:a")),
        ("targets.gpt 4o", with_target("gpt 4o")),
        ("targets.gpt{4o}", with_target("gpt{4o}")),
        ("targets.a}b", with_target("a}b")),
        ("targets.", with_target("")),
        ("features.chat room", with_feature("chat room")),
        ("features.{chat}", with_feature("{chat}")),
        ("features.chat\nroom", with_feature("chat\nroom")),
    ]);
    // What is allowed: letters, digits and ._-:/@ in names (model ids look like these), the
    // same but `:` in the namespace.
    let mut ok = with_target("anthropic/claude-3.5:latest@eu_west");
    ok.namespace = "team.a-b_c/e@f".to_owned();
    ok.validate()
        .expect("names with ._-:/@, namespace with ._-/@");
}

#[test]
fn redis_needs_exactly_one_of_url_and_cluster() {
    assert_all_refused(vec![
        (
            "redis.cluster",
            redis(|r| r.cluster = vec!["redis://127.0.0.1:7000".into()]),
        ),
        ("redis.url", redis(|r| r.url = None)),
    ]);
}

#[test]
fn bad_redis_values_name_their_field() {
    assert_all_refused(vec![
        (
            "redis.url",
            redis(|r| r.url = Some("http://127.0.0.1:6379".into())),
        ),
        (
            "redis.url",
            redis(|r| r.url = Some("127.0.0.1:6379".into())),
        ),
        ("redis.url", redis(|r| r.url = Some(String::new()))),
        (
            "redis.cluster[1]",
            redis(|r| {
                r.url = None;
                r.cluster = vec!["redis://a:7000".into(), "tcp://b:7001".into()];
            }),
        ),
        ("redis.timeout", redis(|r| r.timeout = Duration::ZERO)),
        ("redis.timeout", redis(|r| r.timeout = 11 * SEC)),
        (
            "redis.connect_timeout",
            redis(|r| r.connect_timeout = Duration::ZERO),
        ),
        (
            "redis.connect_timeout",
            redis(|r| r.connect_timeout = Duration::MAX),
        ),
        (
            "redis.failure_threshold",
            redis(|r| r.failure_threshold = 0),
        ),
        ("redis.retry_interval", redis(|r| r.retry_interval = 9 * MS)),
        (
            "redis.retry_interval",
            redis(|r| r.retry_interval = 601 * SEC),
        ),
        ("redis.replicas", redis(|r| r.replicas = 0)),
        ("redis.replicas", redis(|r| r.replicas = u32::MAX)),
        ("redis.idle_ttl", redis(|r| r.idle_ttl = 59 * SEC)),
        ("redis.idle_ttl", redis(|r| r.idle_ttl = 31 * 86_400 * SEC)),
        ("redis.settle_queue", redis(|r| r.settle_queue = 0)),
        ("redis.settle_queue", redis(|r| r.settle_queue = usize::MAX)),
        ("redis.settle_batch", redis(|r| r.settle_batch = 0)),
        ("redis.settle_batch", redis(|r| r.settle_batch = 4097)),
        (
            "redis.settle_delay",
            redis(|r| r.settle_delay = Duration::from_millis(101)),
        ),
    ]);
}

const REALISTIC: &str = r#"
# fusebox for the checkout API: 8 replicas share one Redis.
namespace = "checkout-api"

[redis]
url = "redis://:s3cret@redis.internal:6379/2"
timeout = "75ms"
connect_timeout = "2s"
failure_threshold = 3
retry_interval = "500ms"
replicas = 8
idle_ttl = "12h"
settle_queue = 4096
settle_batch = 128
settle_delay = "5ms"

[breaker]
consecutive_failures = 8
failure_rate = 40.0
minimum_calls = 30
window = "2m"
window_buckets = 12
slow_call_duration = "20s"
slow_call_rate = 80.0
open_duration = "30s"
open_duration_multiplier = 2.0
max_open_duration = "10m"
half_open_probes = 3
half_open_successes = 2
probe_timeout = "45s"

[targets."claude-sonnet-4-6".breaker]
consecutive_failures = 3
open_duration = "15s"

[features.chat]
max_concurrent = 200
lease = "2m"
max_wait = "250ms"
on_store_unavailable = "fail_closed"
rate = { requests = 600, per = "1m", burst = 50 }

[features.batch-summaries]
max_concurrent = 20
"#;

#[test]
fn a_realistic_toml_file_parses_into_exactly_what_it_says() {
    let got = Config::from_toml(REALISTIC).expect("the realistic file is valid");
    let mut targets = BTreeMap::new();
    targets.insert(
        "claude-sonnet-4-6".to_owned(),
        TargetConfig {
            breaker: BreakerOverrides {
                consecutive_failures: Some(Some(3)),
                open_duration: Some(15 * SEC),
                // Everything else is inherited from [breaker].
                ..BreakerOverrides::default()
            },
            ..TargetConfig::default()
        },
    );
    let mut features = BTreeMap::new();
    features.insert(
        "chat".to_owned(),
        FeatureConfig {
            max_concurrent: Some(200),
            lease: 120 * SEC,
            max_wait: 250 * MS,
            rate: Some(RateConfig {
                requests: 600,
                per: 60 * SEC,
                burst: Some(50),
            }),
            on_store_unavailable: StorePolicy::FailClosed,
            ..FeatureConfig::default()
        },
    );
    features.insert(
        "batch-summaries".to_owned(),
        FeatureConfig {
            max_concurrent: Some(20),
            ..FeatureConfig::default()
        },
    );
    let expected = Config {
        namespace: "checkout-api".to_owned(),
        redis: Some(RedisConfig {
            url: Some("redis://:s3cret@redis.internal:6379/2".to_owned()),
            cluster: Vec::new(),
            timeout: 75 * MS,
            connect_timeout: 2 * SEC,
            failure_threshold: 3,
            retry_interval: 500 * MS,
            replicas: 8,
            idle_ttl: 12 * 3600 * SEC,
            settle_queue: 4096,
            settle_batch: 128,
            settle_delay: 5 * MS,
            operator_timeout: None,
        }),
        breaker: BreakerConfig {
            consecutive_failures: Some(8),
            failure_rate: Some(40.0),
            minimum_calls: 30,
            window: 120 * SEC,
            window_buckets: 12,
            slow_call_duration: Some(20 * SEC),
            slow_call_rate: 80.0,
            open_duration: 30 * SEC,
            open_duration_multiplier: 2.0,
            max_open_duration: 600 * SEC,
            half_open_probes: 3,
            half_open_successes: 2,
            probe_timeout: 45 * SEC,
        },
        targets,
        features,
        ..Config::default()
    };
    assert_eq!(got, expected);
}

#[test]
fn a_cluster_config_parses() {
    let c = Config::from_toml(
        r#"
        [redis]
        cluster = ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000", "redis://10.0.0.3:7000"]
        "#,
    )
    .expect("a cluster config");
    let r = c.redis.expect("[redis]");
    assert_eq!(r.url, None);
    assert_eq!(r.cluster.len(), 3);
    assert_eq!(r.timeout, RedisConfig::default().timeout);
}

#[test]
fn from_toml_validates_too() {
    let (field, _) = from_toml_field("[features.chat]\nmax_concurrent = 0\n");
    assert_eq!(field, "features.chat.max_concurrent");
    let (field, _) = from_toml_field("[redis]\nurl = \"http://localhost\"\n");
    assert_eq!(field, "redis.url");
    let (field, _) = from_toml_field("[redis]\ntimeout = \"1s\"\n");
    assert_eq!(
        field, "redis.url",
        "a [redis] table with neither url nor cluster"
    );
}

#[test]
fn an_unknown_top_level_field_is_rejected_and_named() {
    let (field, reason) = from_toml_field("namespace = \"x\"\nbogus = 1\n");
    assert_eq!(field, "bogus");
    assert!(reason.contains("unknown field"), "{reason}");
}

/// `Error::Config::field` is documented as "the dotted path of the offending field, e.g.
/// `features.chat.max_concurrent`". A typo inside a table must be reported with its table,
/// or an operator with several features cannot tell which one holds the typo.
#[test]
fn an_unknown_nested_field_is_named_by_its_dotted_path() {
    let (field, reason) = from_toml_field(
        "[features.chat]\nmax_concurrent = 5\n\n[features.batch]\nmax_concurent = 5\n",
    );
    assert!(reason.contains("unknown field"), "{reason}");
    assert_eq!(field, "features.batch.max_concurent");
}

/// A value of the wrong type is rejected with a clear error whose `field` is the field's dotted
/// path (as `Error::Config` documents), not the offending value's text.
#[test]
fn a_wrong_type_is_rejected_with_a_clear_error_naming_the_field() {
    let cases = [
        (
            "[breaker]\nminimum_calls = \"twenty\"\n",
            "breaker.minimum_calls",
            "whole number",
        ),
        ("[breaker]\nwindow = 5\n", "breaker.window", "duration"),
        (
            "[features.chat]\nmax_concurrent = -1\n",
            "features.chat.max_concurrent",
            "whole number",
        ),
        ("[redis]\nurl = 6379\n", "redis.url", "string"),
    ];
    let mut wrong = Vec::new();
    for (text, expected_field, expected_type) in cases {
        let (field, reason) = from_toml_field(text);
        assert!(
            reason.contains(expected_type),
            "{text:?}: the reason should say what was expected ({expected_type}): {reason}"
        );
        if field != expected_field {
            wrong.push(format!(
                "{text:?}: field {field:?}, expected {expected_field:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn absurd_toml_values_are_refused_never_a_panic() {
    let cases = [
        "[breaker]\nminimum_calls = 4294967295\n",
        "[breaker]\nconsecutive_failures = 99999999999\n",
        "[breaker]\nfailure_rate = nan\n",
        "[breaker]\nfailure_rate = 1e308\n",
        "[breaker]\nfailure_rate = -inf\n",
        "[breaker]\nopen_duration_multiplier = inf\n",
        "[breaker]\nopen_duration = \"99999999999999999999999s\"\n",
        "[breaker]\nopen_duration = \"18446744073709551615s\"\n",
        "[breaker]\nwindow = \"-1s\"\n",
        "[breaker]\nwindow = \"\"\n",
        "[breaker]\nwindow_buckets = -1\n",
        "[redis]\nurl = \"redis://x:6379\"\nsettle_queue = 9223372036854775807\n",
        "[features.chat.rate]\nrequests = 0\nper = \"1s\"\n",
        "[features.chat.rate]\nper = \"1s\"\n",
        "[features.chat]\nlease = \"1000000000000h\"\n",
        "namespace = \"{evil}\"\n",
        "[[[",
        "namespace = ",
        "\u{0}",
    ];
    for text in cases {
        let result = std::panic::catch_unwind(|| Config::from_toml(text))
            .unwrap_or_else(|_| panic!("from_toml panicked on {text:?}"));
        match result {
            Err(Error::Config { field, reason }) => {
                // No field only for an error about the whole document (TOML syntax).
                assert!(
                    (!field.is_empty() || reason.contains("TOML syntax")) && !reason.is_empty(),
                    "{text:?}: {field:?} {reason:?}"
                )
            }
            other => panic!("{text:?} should be refused with Error::Config, got {other:?}"),
        }
    }
}

#[test]
fn absurd_toml_values_name_the_field_when_they_parse() {
    for (text, field) in [
        (
            "[breaker]\nminimum_calls = 4294967295\n",
            "breaker.minimum_calls",
        ),
        ("[breaker]\nfailure_rate = nan\n", "breaker.failure_rate"),
        ("[breaker]\nfailure_rate = 1e308\n", "breaker.failure_rate"),
        (
            "[breaker]\nopen_duration_multiplier = inf\n",
            "breaker.open_duration_multiplier",
        ),
        (
            "[targets.m.breaker]\nprobe_timeout = \"2h\"\n",
            "targets.m.breaker.probe_timeout",
        ),
        (
            "[redis]\nurl = \"redis://x:6379\"\nsettle_queue = 9223372036854775807\n",
            "redis.settle_queue",
        ),
    ] {
        assert_eq!(from_toml_field(text).0, field, "{text:?}");
    }
}

#[test]
fn errors_print_field_and_reason() {
    let e = breaker(|b| b.half_open_probes = 0)
        .validate()
        .expect_err("zero probes");
    let text = e.to_string();
    assert!(text.contains("breaker.half_open_probes"), "{text}");
    assert!(text.contains('0'), "{text}");
    assert!(e.rejection().is_none() && e.retry_after().is_none());
}

// ---------------------------------------------------------------------------------------------
// Issue 5 §4: inheritance, switch-off, error messages, the example file
// ---------------------------------------------------------------------------------------------

/// Regression: `[breaker] consecutive_failures = 3` plus a target that sets only
/// `open_duration` gave the target 5 (BreakerConfig's default): fields now inherit one by one.
#[test]
fn target_breaker_fields_inherit_from_breaker_one_by_one() {
    let c = Config::from_toml(
        "[breaker]\nconsecutive_failures = 3\nwindow = \"2m\"\n\
         [targets.x.breaker]\nopen_duration = \"30s\"\n",
    )
    .expect("valid");
    let x = c.breaker_for("x");
    assert_eq!(x.consecutive_failures, Some(3), "inherited from [breaker]");
    assert_eq!(x.window, 120 * SEC, "inherited from [breaker]");
    assert_eq!(x.open_duration, 30 * SEC, "the target's own");
    assert_eq!(c.breaker_for("unlisted"), c.breaker);
    // The resolved form spells every field out, and means the same.
    let resolved = c.resolved();
    assert_eq!(resolved.breaker_for("x"), x);
    assert_eq!(
        resolved.targets["x"].breaker.consecutive_failures,
        Some(Some(3))
    );
}

/// Regression: README said a rule is switched off by omitting it, but omitting gave the
/// default and `false` was rejected. Every rule can be switched off from TOML.
#[test]
fn every_rule_can_be_switched_off_from_toml() {
    let c = Config::from_toml(
        r#"
[breaker]
consecutive_failures = false
failure_rate = "off"
slow_call_duration = "10s"

[targets.a.breaker]
consecutive_failures = 4
slow_call_duration = false

[targets.b.breaker]
failure_rate = 25

[features.chat]
max_concurrent = false
rate = false
"#,
    )
    .expect("valid");
    assert_eq!(c.breaker.consecutive_failures, None);
    assert_eq!(c.breaker.failure_rate, None);
    let a = c.breaker_for("a");
    assert_eq!(a.consecutive_failures, Some(4));
    assert_eq!(a.failure_rate, None, "inherits the switch-off");
    assert_eq!(
        a.slow_call_duration, None,
        "switched off for this target only"
    );
    assert_eq!(c.breaker_for("b").failure_rate, Some(25.0));
    assert_eq!(c.breaker_for("b").slow_call_duration, Some(10 * SEC));
    assert_eq!(c.features["chat"].max_concurrent, None);
    assert_eq!(c.features["chat"].rate, None);

    // A target that switches off every rule of its own is refused, naming it.
    let (field, reason) = from_toml_field(
        "[breaker]\nfailure_rate = false\nconsecutive_failures = 5\n\
         [targets.t.breaker]\nconsecutive_failures = false\n",
    );
    assert_eq!(field, "targets.t.breaker");
    assert!(reason.contains("no rule can open"), "{reason}");

    // `true` is not a value.
    let (field, reason) = from_toml_field("[breaker]\nconsecutive_failures = true\n");
    assert_eq!(field, "breaker.consecutive_failures");
    assert!(reason.contains("false to switch"), "{reason}");
}

/// The resolved configuration, written as TOML (what `fusebox check` prints), parses back to
/// the same configuration: switched-off rules are written `false`, durations as strings.
#[test]
fn the_resolved_configuration_round_trips_through_toml() {
    for text in [
        REALISTIC,
        "[breaker]\nconsecutive_failures = false\nslow_call_duration = \"3s\"\n\
         [targets.\"a.b/c:d@e\".breaker]\nfailure_rate = false\n[features.f]\nrate = false\n",
    ] {
        let c = Config::from_toml(text).expect("valid").resolved();
        let written = toml::to_string(&c).expect("serializes");
        let back = Config::from_toml(&written).unwrap_or_else(|e| panic!("{e}\n{written}"));
        assert_eq!(back, c, "{written}");
    }
}

/// Regression: TOML syntax errors lost their line and column.
#[test]
fn syntax_errors_give_line_and_column() {
    let (field, reason) = from_toml_field("namespace = \"app\"\n\n[breaker]\nwindow = \"1m\n");
    // No field to name: the message leaves it out rather than printing a placeholder.
    assert_eq!(field, "");
    let message = Config::from_toml("namespace = \"app\"\n\n[breaker]\nwindow = \"1m\n")
        .expect_err("a syntax error")
        .to_string();
    assert!(
        message.starts_with("invalid configuration: line 4, column"),
        "{message}"
    );
    assert!(!message.contains("(file)"), "{message}");
    assert!(reason.contains("line 4"), "{reason}");
    assert!(reason.contains("column"), "{reason}");
    // Wrong values say where they are too.
    let (field, reason) = from_toml_field("[features.chat]\n\nlease = \"soon\"\n");
    assert_eq!(field, "features.chat.lease");
    assert!(reason.contains("line 3"), "{reason}");
}

/// Regression: duration errors did not show the accepted form.
#[test]
fn duration_errors_show_the_accepted_form() {
    for text in [
        "[features.chat]\nlease = \"soon\"\n",
        "[breaker]\nwindow = 5\n",
        "[breaker]\nslow_call_duration = \"fast\"\n",
        "[targets.m.breaker]\nopen_duration = \"a while\"\n",
    ] {
        let (_, reason) = from_toml_field(text);
        assert!(reason.contains("\"30s\""), "{text:?}: {reason}");
    }
}

/// Regression: messages carried Rust jargon (`expected u32`, `as i128`, `Duration`
/// debug output) and the namespace hint listed `:` although it is refused.
#[test]
fn messages_speak_toml_not_rust() {
    let mut reasons = Vec::new();
    for text in [
        "[breaker]\nminimum_calls = \"twenty\"\n",
        "[breaker]\nminimum_calls = -1\n",
        "[breaker]\nminimum_calls = 99999999999999\n",
        "[features.chat]\nmax_concurrent = 1.5\n",
        "[breaker]\nfailure_rate = \"high\"\n",
        "[breaker]\nopen_duration = \"0s\"\n",
        "[redis]\nurl = \"redis://h:1\"\ntimeout = \"1h\"\n",
        "[features.chat]\nrate = { requests = 0, per = \"1s\" }\n",
        "[targets.m.breaker]\nwindow_buckets = \"many\"\n",
    ] {
        let (_, reason) = from_toml_field(text);
        reasons.push(format!("{text:?}: {reason}"));
    }
    for r in &reasons {
        for jargon in [
            "u32", "u64", "i64", "i128", "f64", "usize", "Duration", "Some(",
        ] {
            assert!(!r.contains(jargon), "{jargon:?} in {r}");
        }
    }
    let (field, reason) = from_toml_field("namespace = \"a:b\"\n");
    assert_eq!(field, "namespace");
    assert!(reason.contains("':'"), "{reason}");
    assert!(!reason.contains(":/@"), "the hint offers ':': {reason}");
}

/// README's commands use `fusebox.example.toml`: it parses, is embedded (no `[redis]`), and
/// shows inheritance and a switch-off.
#[test]
fn the_example_file_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fusebox.example.toml");
    let text = std::fs::read_to_string(&path).expect("fusebox.example.toml is in the repository");
    let c = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.redis.is_none(), "the example runs embedded by default");
    assert!(text.contains("# [redis]"), "with a commented Redis section");
    assert!(!c.targets.is_empty() && !c.features.is_empty());
    // Every feature can be served by `fusebox serve` (a feature without a chain is a 500
    // there: the new-user review asked for one with `x-fusebox-feature` and got it).
    for (name, f) in &c.features {
        assert!(!f.chain.is_empty(), "features.{name} has no chain");
    }
}

/// Issue 5 §2.9: `requests = 1, per = "24h", burst = 1000000` pushed the limiter's stored
/// time past 2^53 µs, where Redis (Lua doubles) and the in-memory store (i128) disagree. The
/// time a full burst takes to refill is bounded (365 days), well inside exact doubles.
#[test]
fn a_burst_that_takes_over_a_year_to_refill_is_refused() {
    let (field, reason) =
        from_toml_field("[features.f]\nrate = { requests = 1, per = \"24h\", burst = 1000000 }\n");
    assert_eq!(field, "features.f.rate.burst");
    assert!(reason.contains("refill"), "{reason}");
    // The edge: exactly 365 days is accepted, one more request's worth is not.
    Config::from_toml("[features.f]\nrate = { requests = 1, per = \"24h\", burst = 365 }\n")
        .expect("365 days to refill is accepted");
    let (field, _) =
        from_toml_field("[features.f]\nrate = { requests = 1, per = \"24h\", burst = 366 }\n");
    assert_eq!(field, "features.f.rate.burst");
    // The largest accepted stored time stays far below 2^53 µs even a century from now.
    let max_us = 365u64 * 86_400 * 1_000_000;
    let year_2126_us = 4_923_000_000u64 * 1_000_000;
    assert!(max_us + year_2126_us < 1 << 53);
    // Ordinary rates are untouched.
    Config::from_toml(
        "[features.f]\nrate = { requests = 1000000000, per = \"24h\", burst = 1000000000 }\n",
    )
    .expect("a high rate with a large burst refills in a day");
}

/// Issue 5 §2.6: with `idle_ttl` shorter than an open period plus a probe, the breaker's hash
/// expired while open or half-open and the breaker silently closed. Such a configuration is
/// refused, naming `redis.idle_ttl` and the breaker that needs more.
#[test]
fn idle_ttl_must_outlive_an_open_period_and_a_probe() {
    let base = "[redis]\nurl = \"redis://127.0.0.1:6379\"\nidle_ttl = \"1m\"\n";
    let (field, reason) = from_toml_field(&format!(
        "{base}[breaker]\nopen_duration = \"30s\"\nmax_open_duration = \"30s\"\nprobe_timeout = \"1m\"\n"
    ));
    assert_eq!(field, "redis.idle_ttl");
    assert!(
        reason.contains("breaker's longest open period + probe_timeout"),
        "{reason}"
    );
    // A target's own (inherited-over) settings count too.
    let (field, reason) = from_toml_field(&format!(
        "{base}[breaker]\nopen_duration = \"10s\"\nmax_open_duration = \"10s\"\nprobe_timeout = \"10s\"\n\
         [targets.slow.breaker]\nprobe_timeout = \"55s\"\n"
    ));
    assert_eq!(field, "redis.idle_ttl");
    assert!(reason.contains("targets.slow.breaker"), "{reason}");
    Config::from_toml(&format!(
        "{base}[breaker]\nopen_duration = \"10s\"\nmax_open_duration = \"10s\"\nprobe_timeout = \"10s\"\n"
    ))
    .expect("20 s of open + probe fit in a 1 min idle_ttl");
    // Without growth the open period is open_duration: max_open_duration does not count.
    Config::from_toml(&format!(
        "{base}[breaker]\nopen_duration = \"30s\"\nprobe_timeout = \"20s\"\n"
    ))
    .expect("50 s fit; the default max_open_duration (5 min) applies only with growth");
    let (field, _) = from_toml_field(&format!(
        "{base}[breaker]\nopen_duration = \"30s\"\nprobe_timeout = \"20s\"\n\
         open_duration_multiplier = 2.0\n"
    ));
    assert_eq!(field, "redis.idle_ttl");
    // The defaults fit the default idle_ttl.
    Config::from_toml("[redis]\nurl = \"redis://127.0.0.1:6379\"\n").expect("defaults");
}

const CHAINED: &str = r#"
[targets.sonnet]
model = "claude-sonnet-4-6"
max_tokens = 4096
timeout = "20s"
context_window = 200000

[targets.sonnet.breaker]
consecutive_failures = 3

[features.codegen]
chain = ["sonnet", "haiku"]
stop_before = "haiku"
deadline = "45s"

[features.codegen.canned]
text = "The assistant is busy; please try again in a minute."
retry_after = "1m"
"#;

/// The fallback chain's settings parse into what they say and round-trip through `check`.
#[test]
fn a_chained_feature_parses_and_round_trips() {
    let c = Config::from_toml(CHAINED).unwrap_or_else(|e| panic!("{e}"));
    let t = &c.targets["sonnet"];
    assert_eq!(t.model.as_deref(), Some("claude-sonnet-4-6"));
    assert_eq!(
        (t.max_tokens, t.timeout, t.context_window),
        (Some(4096), Some(20 * SEC), Some(200_000))
    );
    let f = &c.features["codegen"];
    assert_eq!(f.chain, ["sonnet", "haiku"]);
    assert_eq!(f.stop_before.as_deref(), Some("haiku"));
    assert_eq!(f.deadline, Some(45 * SEC));
    let canned = f.canned.as_ref().expect("canned");
    assert_eq!(canned.retry_after, Some(60 * SEC));
    let resolved = c.resolved();
    let written = toml::to_string(&resolved).expect("serializes");
    let back = Config::from_toml(&written).unwrap_or_else(|e| panic!("{e}\n{written}"));
    assert_eq!(back, resolved, "{written}");
}

/// Chain settings are checked with the field named.
#[test]
fn bad_chain_settings_name_their_field() {
    for (text, field) in [
        (
            "[features.f]\nchain = [\"a\", \"a\"]\n",
            "features.f.chain[1]",
        ),
        ("[features.f]\nchain = [\"a{b}\"]\n", "features.f.chain[0]"),
        (
            "[features.f]\nchain = [\"a\"]\nstop_before = \"b\"\n",
            "features.f.stop_before",
        ),
        (
            "[features.f]\nchain = [\"a\", \"b\"]\nstop_before = \"a\"\n",
            "features.f.stop_before",
        ),
        ("[features.f]\ndeadline = \"0s\"\n", "features.f.deadline"),
        (
            "[features.f.canned]\ntext = \"\"\n",
            "features.f.canned.text",
        ),
        ("[targets.t]\ntimeout = \"2h\"\n", "targets.t.timeout"),
        ("[targets.t]\nmax_tokens = 0\n", "targets.t.max_tokens"),
        ("[targets.t]\nmodel = \"\"\n", "targets.t.model"),
    ] {
        assert_eq!(from_toml_field(text).0, field, "{text}");
    }
}

/// A long `open_duration` alone meets the default cap on the grown open duration (5 m): the
/// error names the field to change and says so; durations come back in the unit they were
/// written in. Seen by the new-user review: `breaker.max_open_duration: "5m" is out of range
/// ("10m" to "1day")`, and `"31d"` echoed as `"1month 13h 26m 24s"`.
#[test]
fn a_long_open_duration_says_to_raise_the_cap_and_durations_read_as_written() {
    let (field, reason) = from_toml_field("[breaker]\nopen_duration = \"10m\"\n");
    assert_eq!(field, "breaker.max_open_duration");
    assert!(
        reason.contains("shorter than open_duration (\"10m\")")
            && reason.contains("raise max_open_duration"),
        "{reason}"
    );
    let (_, reason) = from_toml_field("[breaker]\nopen_duration = \"31d\"\n");
    assert!(reason.contains("\"31d\""), "{reason}");
}
