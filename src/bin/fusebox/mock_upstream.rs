//! `fusebox mock-upstream`: the fake Anthropic API (`fusebox::mock`) as a server of its own,
//! to rehearse an outage against your own setup. Failures come from flags at start and from
//! the `/_mock/` control API while it runs.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use fusebox::mock::{MockUpstream, PlanSpec};

use crate::exit::Failure;

/// The model name that stands for every model without flags of its own.
const ANY: &str = "*";

/// `fusebox mock-upstream` flags. A MODEL of `*` means every model without flags of its own.
#[derive(Debug, Args)]
pub(crate) struct MockArgs {
    /// Where to listen (`127.0.0.1:0`: any free port; the line `listening on ADDR` names it).
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
    listen: SocketAddr,
    /// MODEL answers every request (or, with --failure-rate, the failing share) with this
    /// error status, e.g. `claude-sonnet-4-6=529`.
    #[arg(long, value_name = "MODEL=STATUS", value_parser = model_status)]
    fail: Vec<(String, u16)>,
    /// A share (0.0 to 1.0) of MODEL's requests fails (529 unless --fail gives the status),
    /// drawn from --seed, e.g. `claude-haiku-4-5=0.3`.
    #[arg(long, value_name = "MODEL=RATE", value_parser = model_rate)]
    failure_rate: Vec<(String, f64)>,
    /// A wait before each of MODEL's answers, e.g. `claude-haiku-4-5=200ms`.
    #[arg(long, value_name = "MODEL=DURATION", value_parser = model_latency)]
    latency: Vec<(String, Duration)>,
    /// The `retry-after` header of every error status (seconds, or an HTTP date).
    #[arg(long, value_name = "VALUE")]
    retry_after: Option<String>,
    /// MODEL's failures reach streams after the 200: `message_start`, then an SSE `error`
    /// event (a non-streaming request still gets the status).
    #[arg(long, value_name = "MODEL")]
    mid_stream_error: Vec<String>,
    /// MODEL's normal answers say TEXT (instead of echoing the request).
    #[arg(long, value_name = "MODEL=TEXT", value_parser = model_text)]
    text: Vec<(String, String)>,
    /// The seed of the failure-rate draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Answer every request with one prebuilt message at once, without parsing it (for
    /// measuring what sits in front; plans and per-model counters are off).
    #[arg(long)]
    fixed_response: bool,
}

fn split(s: &str) -> Result<(String, &str), String> {
    match s.split_once('=') {
        Some((m, v)) if !m.is_empty() => Ok((m.to_owned(), v)),
        _ => Err("write MODEL=VALUE (MODEL `*`: every model without flags of its own)".into()),
    }
}

fn model_status(s: &str) -> Result<(String, u16), String> {
    let (m, v) = split(s)?;
    match v.parse::<u16>() {
        Ok(code) if (400..=599).contains(&code) => Ok((m, code)),
        _ => Err(format!("{v:?} is not an error status (400 to 599)")),
    }
}

fn model_rate(s: &str) -> Result<(String, f64), String> {
    let (m, v) = split(s)?;
    match v.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok((m, r)),
        _ => Err(format!("{v:?} is not a rate between 0.0 and 1.0")),
    }
}

fn model_latency(s: &str) -> Result<(String, Duration), String> {
    let (m, v) = split(s)?;
    let d = humantime_serde::re::humantime::parse_duration(v)
        .map_err(|e| format!("{v:?}: {e}; write a duration such as 200ms or 2s"))?;
    if d > Duration::from_secs(3600) {
        return Err(format!("{v:?} is more than an hour"));
    }
    Ok((m, d))
}

fn model_text(s: &str) -> Result<(String, String), String> {
    let (m, v) = split(s)?;
    Ok((m, v.to_owned()))
}

impl MockArgs {
    /// Each named model's plan (`*` included), from the flags.
    fn specs(&self) -> Result<BTreeMap<String, PlanSpec>, Failure> {
        let mut specs: BTreeMap<String, PlanSpec> = BTreeMap::new();
        for (m, status) in &self.fail {
            specs.entry(m.clone()).or_default().status = Some(*status);
        }
        for (m, rate) in &self.failure_rate {
            specs.entry(m.clone()).or_default().failure_rate = Some(*rate);
        }
        for (m, latency) in &self.latency {
            specs.entry(m.clone()).or_default().latency_ms =
                Some(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX));
        }
        for m in &self.mid_stream_error {
            specs.entry(m.clone()).or_default().mid_stream_error = Some(String::new());
        }
        for (m, text) in &self.text {
            specs.entry(m.clone()).or_default().text = Some(text.clone());
        }
        if let Some(ra) = &self.retry_after {
            let mut any = false;
            for spec in specs.values_mut() {
                if spec.status.is_some() || spec.failure_rate.is_some() {
                    spec.retry_after = Some(ra.clone());
                    any = true;
                }
            }
            if !any {
                return Err(Failure::usage(
                    "--retry-after: no model fails (give --fail or --failure-rate too)",
                ));
            }
        }
        for (m, spec) in &specs {
            spec.to_plan().map_err(|e| {
                Failure::usage(format!("the flags of model {m:?}: {}", flag_named(&e)))
            })?;
        }
        Ok(specs)
    }
}

/// A [`PlanSpec`] message names its field; the user wrote a flag.
fn flag_named(message: &str) -> String {
    [
        ("status:", "--fail:"),
        ("failure_rate:", "--failure-rate:"),
        ("latency_ms:", "--latency:"),
        ("retry_after:", "--retry-after:"),
        ("mid_stream_error:", "--mid-stream-error:"),
    ]
    .iter()
    .find_map(|(field, flag)| {
        message
            .strip_prefix(field)
            .map(|rest| format!("{flag}{rest}"))
    })
    .unwrap_or_else(|| message.to_owned())
}

/// Starts the server, prints where it listens, and serves until the process is stopped.
pub(crate) async fn run(args: &MockArgs) -> Result<(), Failure> {
    let specs = args.specs()?;
    let mut builder = MockUpstream::builder()
        .listen(args.listen)
        .seed(args.seed)
        .keep_seen(false)
        .fixed_response(args.fixed_response);
    for (model, spec) in &specs {
        let plan = spec.to_plan().map_err(Failure::usage)?;
        builder = if model == ANY {
            builder.default_plan(plan)
        } else {
            builder.model(model.clone(), plan)
        };
    }
    let mock = builder
        .start()
        .await
        .map_err(|e| Failure::internal(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = mock.addr();
    let mut lines = vec![format!("listening on {addr}")];
    if args.fixed_response {
        lines.push("fixed-response mode: every request gets the same message".to_owned());
    }
    for (model, spec) in &specs {
        let plan = serde_json::to_string(spec).unwrap_or_default();
        lines.push(format!("plan {model}: {plan}"));
    }
    lines.push(format!("counts: curl -s http://{addr}/_mock/stats"));
    lines.push(format!(
        "fail a model: curl -s -X PUT http://{addr}/_mock/models/MODEL -d '{{\"status\": 529}}'"
    ));
    let mut out = std::io::stdout().lock();
    for line in lines {
        // A closed stdout must not stop the server.
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    drop(out);
    std::future::pending::<()>().await;
    drop(mock);
    Ok(())
}
