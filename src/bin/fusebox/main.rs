//! `fusebox`: the operator CLI and the proxy.
//!
//! ```text
//! fusebox [-c FILE] serve [--listen ADDR]
//! fusebox [-c FILE] [--timeout DUR] [--json] check
//! fusebox [-c FILE] [--timeout DUR] [--json] status [--watch [--interval DUR]] [NAME]
//! fusebox [-c FILE] [--timeout DUR] [--json] force [--create] TARGET open|closed|disable|reset
//! fusebox mock-upstream [--listen ADDR] [--fail MODEL=STATUS] [--failure-rate MODEL=RATE] ...
//! fusebox demo [--fast | --speed FACTOR]
//! ```
//!
//! Exit codes: see [`exit`].

mod check;
#[cfg(feature = "proxy")]
mod demo;
mod exit;
mod force;
#[cfg(feature = "server")]
mod mock_upstream;
mod render;
#[cfg(feature = "proxy")]
mod serve;
mod status;
mod watch;

/// mimalloc: the proxy allocates a little per request on every thread, and glibc's
/// allocator spent about a tenth of its CPU in a profile (README "Measured").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use fusebox::{Config, Force};

use crate::exit::Failure;

/// Operator tools for fusebox: check a configuration, read the fleet's breakers and
/// bulkheads, force a breaker.
#[derive(Debug, Parser)]
#[command(name = "fusebox", version, about, after_help = exit::HELP)]
struct Cli {
    /// The configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "FUSEBOX_CONFIG",
        default_value = "fusebox.toml",
        value_name = "FILE"
    )]
    config: PathBuf,
    /// Bound on each store operation of this command (`500ms`, `2s`; at most 10 s).
    /// Default: `redis.operator_timeout`, else `redis.connect_timeout`.
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and print it resolved, as TOML (passwords and the admin token
    /// redacted).
    Check,
    /// Show breakers and bulkheads as the shared store holds them. Without NAME: every
    /// configured and every known target and feature.
    Status {
        /// One target (or feature) to show in detail.
        name: Option<String>,
        /// Keep reading, like `top`: redraw in place on a terminal, print one reading after
        /// another otherwise (with `--json`: one document per line). Ctrl-C ends it (exit 0).
        #[arg(short, long)]
        watch: bool,
        /// Time between two readings of `--watch` (100ms to 1h). Default: 2s.
        #[arg(short = 'n', long, value_name = "DURATION", value_parser = watch::parse_interval, requires = "watch")]
        interval: Option<Duration>,
    },
    /// Force a target's breaker, fleet-wide (needs `[redis]`).
    Force {
        /// The target (model or endpoint).
        target: String,
        /// What to do.
        action: Action,
        /// Force a target that is neither under [targets] nor has state in the store yet
        /// (without it such a name is refused: most likely a typo).
        #[arg(long)]
        create: bool,
    },
    /// Run the fake Anthropic API (no key, no network), with failures set by flags and at
    /// run time over HTTP (`/_mock/`), to rehearse an outage. Needs no configuration file.
    #[cfg(feature = "server")]
    MockUpstream(mock_upstream::MockArgs),
    /// Watch fusebox ride out an outage in about 30 s: the proxy and a fake Anthropic API in
    /// this process (no network, no Redis, no configuration file), a scripted outage, what
    /// happened second by second, and a summary.
    #[cfg(feature = "proxy")]
    Demo(demo::DemoArgs),
    /// Run the Anthropic-compatible proxy (`POST /v1/messages`) until SIGTERM or Ctrl-C.
    /// Prints `fusebox serve: listening on ADDR` once bound; logs go to stderr (`RUST_LOG`).
    /// Serves on `[server] threads` threads (default one per core, or TOKIO_WORKER_THREADS).
    #[cfg(feature = "proxy")]
    Serve {
        /// Listen address (`host:port`; port 0 picks one), over `server.listen` and
        /// FUSEBOX_LISTEN.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Action {
    /// Hold open: refuse every call to the target.
    Open,
    /// Hold closed: admit every call, never trip.
    Closed,
    /// Switch the breaker off: calls flow, nothing is counted.
    Disable,
    /// Back to normal operation: closed, with an empty window.
    Reset,
}

impl Action {
    fn force(self) -> Force {
        match self {
            Action::Open => Force::Open,
            Action::Closed => Force::Closed,
            Action::Disable => Force::Disable,
            Action::Reset => Force::Reset,
        }
    }
}

/// Longest `--timeout` (as `redis.operator_timeout`).
const MAX_TIMEOUT: Duration = Duration::from_secs(10);

/// `--timeout`: a duration from 1 ms to 10 s, checked here so that the message names the
/// flag (the configuration's checks would name `redis.timeout`, which the user did not set).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let t = humantime_serde::re::humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration such as \"500ms\", \"2s\" or \"1m\""))?;
    if t < Duration::from_millis(1) || t > MAX_TIMEOUT {
        return Err(format!(
            "{} is out of range: --timeout takes 1ms to 10s",
            humantime_serde::re::humantime::format_duration(t)
        ));
    }
    Ok(t)
}

/// Parses the command line. Help and version are printed and exit 0, as clap does; a usage
/// error exits 2 with clap's message on stderr and, when `--json` was given, also as the
/// JSON error object every other failure prints.
fn parse() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                    && !json_requested()
            {
                // Help on stdout (exit 0); help for a missing subcommand exits 2, as usage.
                let _ = e.print();
                return Err(ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2)));
            }
            if !json_requested() {
                let _ = e.print();
                return Err(ExitCode::from(2));
            }
            let text = e.render().to_string();
            let message = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("usage error")
                .trim_start_matches("error: ")
                .to_owned();
            eprint!("{text}");
            Err(Failure::usage(message).report_json_only())
        }
    }
}

/// Whether `--json` is on the command line (before a `--`), for failures clap reports before
/// the flags are known.
fn json_requested() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let runtime = match runtime(&cli.command) {
        Ok(rt) => rt,
        Err(failure) => return failure.report(cli.json),
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(cli.json),
    }
}

/// Servers (the proxy, the mock upstream) use every core; the operator commands make a
/// few store calls on one thread.
fn runtime(command: &Command) -> Result<tokio::runtime::Runtime, Failure> {
    let (mut builder, multi) = match command {
        #[cfg(feature = "server")]
        Command::MockUpstream(_) => (tokio::runtime::Builder::new_multi_thread(), true),
        // The proxy's accept loop and the coordinator's background work run on this
        // thread; it starts a thread (and runtime) of its own per further core
        // (`server.threads`, else TOKIO_WORKER_THREADS, else one per core).
        #[cfg(feature = "proxy")]
        Command::Serve { .. } => (tokio::runtime::Builder::new_current_thread(), true),
        #[cfg(feature = "proxy")]
        Command::Demo(_) => (tokio::runtime::Builder::new_multi_thread(), true),
        _ => (tokio::runtime::Builder::new_current_thread(), false),
    };
    // Tokio reads TOKIO_WORKER_THREADS itself and panics on a bad value (an empty one too):
    // read it here, so that a bad value is an error naming it. (A current-thread runtime
    // ignores `worker_threads`: `fusebox serve` reads the variable as its thread count.)
    if let Some(v) = std::env::var_os("TOKIO_WORKER_THREADS").filter(|_| multi) {
        match v.to_str().and_then(|v| v.trim().parse::<usize>().ok()) {
            Some(n) if n >= 1 => {
                builder.worker_threads(n);
            }
            // A setting from the environment: a configuration error (exit 3), like a bad
            // `server.threads`.
            _ => {
                return Err(Failure::config(format!(
                    "TOKIO_WORKER_THREADS must be a number of threads, 1 or more (it is {v:?}); \
                     unset it to use one thread per core"
                )))
            }
        }
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| Failure::internal(format!("cannot start the runtime: {e}")))
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    // Commands that need no configuration file.
    #[cfg(feature = "server")]
    if let Command::MockUpstream(args) = &cli.command {
        return mock_upstream::run(args).await;
    }
    #[cfg(feature = "proxy")]
    if let Command::Demo(args) = &cli.command {
        return demo::run(args).await;
    }
    #[cfg(feature = "proxy")]
    if let Command::Serve { listen } = &cli.command {
        // The proxy's store calls are hot-path calls: the file's bounds, not an operator's.
        return serve::run(read(cli)?, listen.as_deref()).await;
    }
    let config = load(cli)?;
    let done = match &cli.command {
        // `check` prints the configuration as the file says it, not with the operator's
        // bounds applied (a hot-path `redis.timeout` of 2 s copied from it would be wrong).
        Command::Check => check::run(cli, &read(cli)?),
        Command::Status {
            name, watch: false, ..
        } => status::run(cli, config, name.as_deref()).await,
        Command::Status {
            name,
            watch: true,
            interval,
        } => {
            let every = interval.unwrap_or(Duration::from_secs(2));
            watch::run(cli, config, name.as_deref(), every).await
        }
        Command::Force {
            target,
            action,
            create,
        } => force::run(cli, config, target, *action, *create).await,
        #[cfg(feature = "server")]
        Command::MockUpstream(_) => Ok(()),
        #[cfg(feature = "proxy")]
        Command::Demo(_) => Ok(()),
        #[cfg(feature = "proxy")]
        Command::Serve { .. } => Ok(()),
    };
    // The bound is per store call (README): say so, since the command as a whole may have
    // run longer than the one timeout the message names.
    done.map_err(|f| {
        if f.is_timeout() {
            f.noting(&format!(
                " (the bound applies to each store call: --timeout, else \
                 redis.operator_timeout, else redis.connect_timeout; the whole command ran \
                 {:.2} s)",
                started.elapsed().as_secs_f64()
            ))
        } else {
            f
        }
    })
}

/// Reads and validates the configuration as the file says it, with the environment's
/// overrides (`FUSEBOX_LISTEN`, `FUSEBOX_UPSTREAM`, `FUSEBOX_REDIS_URL`,
/// `FUSEBOX_ADMIN_TOKEN`).
fn read(cli: &Cli) -> Result<Config, Failure> {
    let path = cli.config.display();
    let text = std::fs::read_to_string(&cli.config).map_err(|e| {
        Failure::config(format!(
            "cannot read {path}: {e} (choose a file with -c FILE or FUSEBOX_CONFIG)"
        ))
    })?;
    let mut config =
        Config::from_toml(&text).map_err(|e| Failure::config(format!("{path}: {e}")))?;
    config
        .apply_env()
        .map_err(|e| Failure::config(format!("{path} with the FUSEBOX_* environment: {e}")))?;
    Ok(config)
}

/// Reads and validates the configuration, with the operator's bound (`--timeout`, else
/// `redis.operator_timeout`) applied to every store call this process makes.
fn load(cli: &Cli) -> Result<Config, Failure> {
    let mut config = read(cli)?;
    if let Some(redis) = config.redis.as_mut() {
        if let Some(t) = cli.timeout {
            redis.operator_timeout = Some(t);
        }
        // This process has no hot path: every store call it makes is an operator's, with
        // the operator's bound.
        redis.timeout = redis.resolved_operator_timeout();
        // Connecting is bounded by it too: `--timeout 100ms` must not wait out a 5 s
        // `connect_timeout` first.
        redis.connect_timeout = redis.connect_timeout.min(redis.timeout);
        config
            .validate()
            .map_err(|e| Failure::config(e.to_string()))?;
    }
    Ok(config)
}

/// Writes `text` to stdout; a closed pipe (`fusebox status | head -1`) is not an error.
fn print(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::internal(format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

/// Pretty JSON plus a newline.
fn print_json(value: &serde_json::Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::internal(format!("cannot encode JSON: {e}")))?;
    print(&format!("{text}\n"))
}
