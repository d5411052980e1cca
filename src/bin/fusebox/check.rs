//! `fusebox check`: validate, then print the configuration resolved (every default filled
//! in, every target's inherited breaker settings spelled out), passwords redacted.

use fusebox::Config;

use crate::exit::Failure;
use crate::{print, print_json, Cli};

pub(crate) fn run(cli: &Cli, config: &Config) -> Result<(), Failure> {
    let resolved = config.resolved().redacted();
    if cli.json {
        let value = serde_json::to_value(&resolved)
            .map_err(|e| Failure::internal(format!("cannot encode JSON: {e}")))?;
        return print_json(&serde_json::json!({
            "file": cli.config.display().to_string(),
            "valid": true,
            "config": value,
        }));
    }
    let text = toml::to_string(&resolved)
        .map_err(|e| Failure::internal(format!("cannot encode TOML: {e}")))?;
    print(&format!(
        "# {}: valid. Resolved (defaults filled in, passwords redacted):\n\n{text}",
        cli.config.display()
    ))
}
