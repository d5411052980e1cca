//! `fusebox force [--create] TARGET open|closed|disable|reset`: an operator command,
//! fleet-wide, on a configured or known target (or a new one with `--create`).

use fusebox::{Config, Coordinator};
use serde_json::json;

use crate::exit::Failure;
use crate::{print, print_json, Action, Cli};

pub(crate) async fn run(
    cli: &Cli,
    config: Config,
    target: &str,
    action: Action,
    create: bool,
) -> Result<(), Failure> {
    if config.redis.is_none() {
        return Err(Failure::refused(format!(
            "{}: no [redis] table, so each process that embeds fusebox keeps its own state, \
             and a breaker forced here would change only this command's memory. Configure \
             [redis] to share state across the fleet, or call Coordinator::force inside the \
             service.",
            cli.config.display()
        )));
    }
    let cmd = action.force();
    let coordinator = Coordinator::new(config)
        .await
        .map_err(|e| Failure::from_error("cannot start", e))?;
    let forced = if create {
        coordinator.force_create(target, cmd).await
    } else {
        coordinator.force(target, cmd).await
    };
    let tr = forced.map_err(|e| Failure::from_error(&format!("force {target}"), e))?;
    if cli.json {
        return print_json(&match &tr {
            Some(t) => json!({
                "target": target,
                "changed": true,
                "from": t.from.as_str(),
                "to": t.to.as_str(),
                "generation": t.generation,
            }),
            None => json!({
                "target": target,
                "changed": false,
                "to": cmd.target_state().as_str(),
            }),
        });
    }
    match tr {
        Some(t) => print(&format!(
            "{target}: {} -> {} (generation {}), fleet-wide\n",
            t.from, t.to, t.generation
        )),
        None => print(&format!("{target}: already {}\n", cmd.target_state())),
    }
}
