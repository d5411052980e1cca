//! `fusebox status [NAME]`: breakers and bulkheads as the shared store holds them. Never
//! shows this process's own state as the fleet's: without `[redis]` it says the state is not
//! visible from here; when Redis cannot be read it fails with the cause (exit 4). One entry
//! that cannot be read (a stray key: a name no configuration could hold, a key of the wrong
//! type) does not hide the others: it is listed, escaped, with what is wrong, and the command
//! exits 6 after printing everything.

use std::collections::BTreeSet;

use fusebox::breaker::BreakerSnapshot;
use fusebox::config::redact_url;
use fusebox::{Config, Coordinator};
use serde_json::{json, Value};

use crate::exit::Failure;
use crate::render::{
    breaker_json, breaker_line, permits_line, rate_line, source_name, window_line,
};
use crate::{print, Cli};

/// What one reading of the store printed: text or JSON, and whether some entries could not
/// be read (exit 6 in the once form).
pub(crate) struct Frame {
    out: Output,
    partial: Option<Failure>,
}

enum Output {
    Text(String),
    Json(Value),
}

impl Frame {
    /// The frame as it is printed: text as it is, JSON pretty (once) or on one line (watch).
    pub(crate) fn render(&self, compact: bool) -> Result<String, Failure> {
        match &self.out {
            Output::Text(t) => Ok(t.clone()),
            Output::Json(v) => {
                let text = if compact {
                    serde_json::to_string(v)
                } else {
                    serde_json::to_string_pretty(v)
                };
                text.map(|t| t + "\n")
                    .map_err(|e| Failure::internal(format!("cannot encode JSON: {e}")))
            }
        }
    }
}

/// The store `status` reads, as it is named in the output (password redacted).
pub(crate) fn store_label(config: &Config) -> Option<String> {
    let redis = config.redis.as_ref()?;
    Some(match &redis.url {
        Some(url) => redact_url(url),
        None => format!(
            "cluster {}",
            redis
                .cluster
                .iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// `fusebox status [NAME]`, once: prints one frame.
pub(crate) async fn run(cli: &Cli, config: Config, name: Option<&str>) -> Result<(), Failure> {
    let coordinator = connect(&config).await?;
    let frame = read(cli, &config, coordinator.as_ref(), name).await?;
    print(&frame.render(false)?)?;
    frame.partial.map_or(Ok(()), Err)
}

/// A coordinator on the configured store (`None`: no `[redis]`, nothing to read).
pub(crate) async fn connect(config: &Config) -> Result<Option<Coordinator>, Failure> {
    if config.redis.is_none() {
        return Ok(None);
    }
    Coordinator::new(config.clone())
        .await
        .map(Some)
        .map_err(|e| Failure::from_error("cannot start", e))
}

/// One reading of the store, as a frame.
pub(crate) async fn read(
    cli: &Cli,
    config: &Config,
    coordinator: Option<&Coordinator>,
    name: Option<&str>,
) -> Result<Frame, Failure> {
    let (Some(coordinator), Some(store)) = (coordinator, store_label(config)) else {
        return embedded(cli, config, name);
    };
    let namespace = config.namespace.clone();
    let (targets, features) = match name {
        Some(n) if config.features.contains_key(n) && !config.targets.contains_key(n) => {
            (BTreeSet::new(), BTreeSet::from([n.to_owned()]))
        }
        Some(n) => {
            if !configured_targets(config).contains(n) {
                // A name no configuration could hold is a configuration error (exit 3).
                fusebox::config::check_name("target", n)
                    .map_err(|e| Failure::from_error("status", e))?;
                // Neither configured nor a feature: a typo shown as a healthy "closed"
                // breaker misleads; ask the store whether the name has state at all.
                let known = coordinator
                    .known_names()
                    .await
                    .map_err(|e| Failure::from_error(&format!("cannot list {store}"), e))?;
                if !known.value.targets.contains(n) && !known.value.features.contains(n) {
                    return Err(unknown_name(n, Some(&namespace)));
                }
                if !known.value.targets.contains(n) {
                    (BTreeSet::new(), BTreeSet::from([n.to_owned()]))
                } else {
                    (BTreeSet::from([n.to_owned()]), BTreeSet::new())
                }
            } else {
                (BTreeSet::from([n.to_owned()]), BTreeSet::new())
            }
        }
        None => {
            // Configured targets: under [targets] and in every feature's chain.
            let known = coordinator
                .known_names()
                .await
                .map_err(|e| Failure::from_error(&format!("cannot list {store}"), e))?;
            let mut targets = known.value.targets;
            targets.extend(configured_targets(config));
            let mut features = known.value.features;
            features.extend(config.features.keys().cloned());
            (targets, features)
        }
    };

    // Live replicas of the namespace (coordinators that admitted a call recently).
    let replicas = if name.is_none() {
        Some(
            coordinator
                .replicas()
                .await
                .map_err(|e| Failure::from_error(&format!("cannot list replicas on {store}"), e))?,
        )
    } else {
        None
    };
    let mut target_rows: Vec<(String, bool, Row)> = Vec::new();
    let mut now = 0;
    let mut source = "shared";
    let mut unreadable = 0usize;
    let configured = configured_targets(config);
    for t in &targets {
        let value = match coordinator.read_breaker(t).await {
            Ok(r) => {
                now = r.now_ms;
                source = source_name(r.source);
                Ok(r.value)
            }
            Err(e) if name.is_none() && this_entry_only(&e) => {
                unreadable += 1;
                Err(printable(&e.to_string()))
            }
            Err(e) => {
                return Err(Failure::from_error(
                    &format!("cannot read target {t:?} from {store}"),
                    e,
                ))
            }
        };
        target_rows.push((t.clone(), configured.contains(t), value));
    }
    let mut feature_rows = Vec::new();
    for f in &features {
        let cfg = config.features.get(f);
        let in_flight = match cfg {
            Some(_) => match coordinator.read_in_flight(f).await {
                Ok(r) => {
                    source = source_name(r.source);
                    Some(Ok(r.value))
                }
                Err(e) if name.is_none() && this_entry_only(&e) => {
                    unreadable += 1;
                    Some(Err(printable(&e.to_string())))
                }
                Err(e) => {
                    return Err(Failure::from_error(
                        &format!("cannot read feature {f:?} from {store}"),
                        e,
                    ))
                }
            },
            None => None,
        };
        feature_rows.push((f.clone(), cfg.cloned(), in_flight));
    }

    let partial = || {
        (unreadable > 0).then(|| {
            Failure::partial(format!(
                "{unreadable} entr{} could not be read (marked in the listing)",
                if unreadable == 1 { "y" } else { "ies" }
            ))
        })
    };
    if cli.json {
        let v = json!({
            "store": source,
            "redis": store,
            "namespace": namespace,
            "now_ms": now,
            "live_replicas": replicas.as_ref().map(Vec::len),
            "replicas": replicas.as_ref().map(|r| r.iter().map(|m| json!({
                "id": m.id,
                "expires_in_ms": m.expires_in.as_millis() as u64,
            })).collect::<Vec<Value>>()),
            "targets": target_rows.iter().map(|(n, configured, s)| {
                let mut v = match s {
                    Ok(s) => breaker_json(s, now),
                    Err(e) => json!({ "error": e }),
                };
                v["name"] = json!(n);
                v["configured"] = json!(configured);
                v
            }).collect::<Vec<Value>>(),
            "features": feature_rows.iter().map(|(n, cfg, in_flight)| json!({
                "name": n,
                "configured": cfg.is_some(),
                "in_flight": in_flight.as_ref().and_then(|r| r.as_ref().ok()),
                "error": in_flight.as_ref().and_then(|r| r.as_ref().err()),
                "limit": cfg.as_ref().and_then(|c| c.max_concurrent),
                "rate": cfg.as_ref().and_then(|c| c.rate.as_ref()).map(|r| json!({
                    "requests": r.requests,
                    "per_ms": r.per.as_millis() as u64,
                    "burst": r.burst.unwrap_or(r.requests),
                })),
            })).collect::<Vec<Value>>(),
        });
        return Ok(Frame {
            out: Output::Json(v),
            partial: partial(),
        });
    }
    let mut out = format!("store: {source} ({store}), namespace {namespace:?}\n");
    if let Some(r) = &replicas {
        out.push_str(&format!(
            "live replicas: {} (coordinators that admitted a call recently)\n",
            r.len()
        ));
    }
    if !target_rows.is_empty() {
        let rows: Vec<[String; 3]> = target_rows
            .iter()
            .map(|(n, configured, s)| {
                let shown = escaped(n);
                let shown = if *configured || name.is_some() {
                    shown
                } else {
                    format!("{shown} (default breaker)")
                };
                match s {
                    Ok(s) => [shown, breaker_line(s, now), window_line(s)],
                    Err(e) => [shown, "unreadable (see next column)".to_owned(), e.clone()],
                }
            })
            .collect();
        out.push('\n');
        out.push_str(&table(["TARGET", "STATE", "WINDOW"], &rows));
    }
    if !feature_rows.is_empty() {
        let rows: Vec<[String; 3]> = feature_rows
            .iter()
            .map(|(n, cfg, in_flight)| match (cfg, in_flight) {
                (Some(_), Some(Err(e))) => [
                    escaped(n),
                    "unreadable (see next column)".to_owned(),
                    e.clone(),
                ],
                (Some(c), in_flight) => [
                    escaped(n),
                    permits_line(
                        in_flight.as_ref().and_then(|r| r.as_ref().ok()).copied(),
                        c.max_concurrent,
                    ),
                    rate_line(c.rate.as_ref()),
                ],
                (None, _) => [
                    escaped(n),
                    "(not in this configuration)".to_owned(),
                    String::new(),
                ],
            })
            .collect();
        out.push('\n');
        out.push_str(&table(["FEATURE", "PERMITS", "RATE"], &rows));
    }
    if target_rows.is_empty() && feature_rows.is_empty() {
        out.push_str("\nno targets or features configured or known in this namespace\n");
    }
    Ok(Frame {
        out: Output::Text(out),
        partial: partial(),
    })
}

/// A breaker read, or why this one entry could not be read.
type Row = Result<BreakerSnapshot, String>;

/// Targets the configuration names: under `[targets]` and in every feature's `chain`.
fn configured_targets(config: &Config) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = config.targets.keys().cloned().collect();
    for f in config.features.values() {
        names.extend(f.chain.iter().cloned());
    }
    names
}

/// `status NAME` on a name neither configured (under `[targets]`, in a feature's `chain`,
/// under `[features]`) nor with state in the store: refused like `force` refuses one (exit 5).
fn unknown_name(name: &str, namespace: Option<&str>) -> Failure {
    const WHERE: &str = "under [targets], in a feature's chain or under [features]";
    let name = escaped(name);
    Failure::refused(match namespace {
        Some(ns) => format!(
            "unknown name {name}: neither configured ({WHERE}) nor known to the store (no \
             state under namespace {ns:?}); check the name"
        ),
        None => format!(
            "unknown name {name}: neither configured ({WHERE}) nor known to a store (no \
             [redis] table to ask); check the name"
        ),
    })
}

/// An error that concerns one entry (a stray key found by SCAN: a name no configuration
/// could hold, a key of the wrong type) rather than the store: listed, not fatal (in the
/// whole listing; `status NAME` fails with it as before).
fn this_entry_only(e: &fusebox::Error) -> bool {
    match e {
        fusebox::Error::Config { .. }
        | fusebox::Error::UnknownTarget(_)
        | fusebox::Error::UnknownFeature(_) => true,
        fusebox::Error::Store(s) => matches!(s.kind(), "command" | "reply"),
        _ => false,
    }
}

/// A name as the terminal may show it: anything but printable ASCII escaped (valid names
/// are printable ASCII, so they are shown as they are).
fn escaped(name: &str) -> String {
    if name.chars().all(|c| c.is_ascii_graphic()) {
        name.to_owned()
    } else {
        format!("{:?}", name)
    }
}

/// A message with its control characters escaped (it may quote what a stray key holds).
fn printable(message: &str) -> String {
    message
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// No `[redis]`: the state lives inside each process that embeds fusebox. List what is
/// configured, and say that the state is not visible from here.
fn embedded(cli: &Cli, config: &Config, name: Option<&str>) -> Result<Frame, Failure> {
    let note = "no [redis] table: each process that embeds fusebox keeps its own state, which \
                this command cannot see";
    if let Some(n) = name {
        if !configured_targets(config).contains(n) && !config.features.contains_key(n) {
            fusebox::config::check_name("target", n)
                .map_err(|e| Failure::from_error("status", e))?;
            return Err(unknown_name(n, None));
        }
    }
    let keep = |n: &String| name.is_none_or(|want| want == n);
    if cli.json {
        let v = json!({
            "store": "embedded",
            "state_visible": false,
            "note": note,
            "targets": configured_targets(config).iter().filter(|n| keep(n)).map(|n| json!({"name": n, "configured": true})).collect::<Vec<_>>(),
            "features": config.features.iter().filter(|(n, _)| keep(n)).map(|(n, c)| json!({
                "name": n,
                "configured": true,
                "limit": c.max_concurrent,
                "rate": c.rate.as_ref().map(|r| json!({
                    "requests": r.requests,
                    "per_ms": r.per.as_millis() as u64,
                    "burst": r.burst.unwrap_or(r.requests),
                })),
            })).collect::<Vec<_>>(),
        });
        return Ok(Frame {
            out: Output::Json(v),
            partial: None,
        });
    }
    let mut out = format!("store: embedded ({note})\n");
    let targets: Vec<[String; 2]> = configured_targets(config)
        .iter()
        .filter(|n| keep(n))
        .map(|n| [n.clone(), "configured".to_owned()])
        .collect();
    if !targets.is_empty() {
        out.push('\n');
        out.push_str(&table(["TARGET", "BREAKER"], &targets));
    }
    let features: Vec<[String; 3]> = config
        .features
        .iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, c)| {
            [
                n.clone(),
                match c.max_concurrent {
                    Some(l) => format!("limit {l}"),
                    None => "no bulkhead".to_owned(),
                },
                rate_line(c.rate.as_ref()),
            ]
        })
        .collect();
    if !features.is_empty() {
        out.push('\n');
        out.push_str(&table(["FEATURE", "PERMITS", "RATE"], &features));
    }
    Ok(Frame {
        out: Output::Text(out),
        partial: None,
    })
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}
