//! `fusebox`: a small operator CLI over the coordinator (the proxy comes later).
//!
//! ```text
//! fusebox check  CONFIG.toml                  validate a configuration, print it resolved
//! fusebox status CONFIG.toml TARGET           show a target's breaker as the fleet sees it
//! fusebox force  CONFIG.toml TARGET open|closed|disable|reset
//! ```

use std::io::Write;
use std::process::ExitCode;

use fusebox::{Config, Coordinator, Force};

const USAGE: &str = "usage:
  fusebox check  CONFIG.toml
  fusebox status CONFIG.toml TARGET
  fusebox force  CONFIG.toml TARGET open|closed|disable|reset";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fusebox: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("fusebox: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Prints to stdout; a closed pipe (`fusebox status … | head -1`) is not an error.
macro_rules! out {
    ($($arg:tt)*) => {{
        let mut stdout = std::io::stdout().lock();
        match writeln!(stdout, $($arg)*) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(format!("cannot write to stdout: {e}"));
            }
            _ => {}
        }
    }};
}

fn load(path: &str) -> Result<Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    Config::from_toml(&text).map_err(|e| format!("{path}: {e}"))
}

async fn run(args: &[String]) -> Result<(), String> {
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["check", path] => {
            let config = load(path)?;
            out!("{path}: ok");
            out!("{config:#?}");
            Ok(())
        }
        ["status", path, target] => {
            let coordinator = Coordinator::new(load(path)?)
                .await
                .map_err(|e| e.to_string())?;
            let s = coordinator
                .read_breaker(target)
                .await
                .map_err(|e| e.to_string())?;
            out!("source: {:?}", s.source);
            out!("{:#?}", s.value);
            Ok(())
        }
        ["force", path, target, cmd] => {
            let cmd = match *cmd {
                "open" => Force::Open,
                "closed" => Force::Closed,
                "disable" => Force::Disable,
                "reset" => Force::Reset,
                other => return Err(format!("unknown command {other:?}\n{USAGE}")),
            };
            let coordinator = Coordinator::new(load(path)?)
                .await
                .map_err(|e| e.to_string())?;
            match coordinator
                .force(target, cmd)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(t) => out!(
                    "{target}: {} -> {} (generation {})",
                    t.from,
                    t.to,
                    t.generation
                ),
                None => out!("{target}: already {}", cmd.target_state()),
            }
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    }
}
