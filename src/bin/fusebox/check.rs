//! `fusebox check`: validate, then print the configuration resolved (every default filled
//! in, every target's inherited breaker settings spelled out), passwords redacted.

use fusebox::Config;

use crate::exit::Failure;
use crate::{print, print_json, Cli};

/// What is valid but most likely a mistake: a chain naming a target that is not under
/// `[targets]` while one with a name a letter or two away is (a typo such as "hiaku" next to
/// `[targets.haiku]` runs as a target of its own, with the `[breaker]` defaults, sending
/// model "hiaku" upstream). A chain target with no near name is taken as meant (a target
/// may well run on the defaults).
fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    // (The default feature and routed ones must have a chain: a configuration error.)
    for (name, feature) in &config.features {
        if feature.chain.is_empty() {
            out.push(format!(
                "features.{name} has no chain: fusebox serve answers a request for it (the \
                 {} header) with a 500; it serves the library's calls only",
                config.server.feature_header
            ));
        }
    }
    for (name, feature) in &config.features {
        for target in &feature.chain {
            if config.targets.contains_key(target) {
                continue;
            }
            if let Some(near) = config
                .targets
                .keys()
                .find(|t| edit_distance(t, target) <= 2)
            {
                out.push(format!(
                    "features.{name}.chain names {target:?}, which is not under [targets], \
                     but {near:?} is: a typo? As written it runs with the [breaker] defaults \
                     and sends model {target:?} upstream"
                ));
            }
        }
    }
    out
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

pub(crate) fn run(cli: &Cli, config: &Config) -> Result<(), Failure> {
    let resolved = config.resolved().redacted();
    let warnings = warnings(config);
    if cli.json {
        let value = serde_json::to_value(&resolved)
            .map_err(|e| Failure::internal(format!("cannot encode JSON: {e}")))?;
        return print_json(&serde_json::json!({
            "file": cli.config.display().to_string(),
            "valid": true,
            "warnings": warnings,
            "config": value,
        }));
    }
    for w in &warnings {
        eprintln!("fusebox check: warning: {w}");
    }
    let text = toml::to_string(&resolved)
        .map_err(|e| Failure::internal(format!("cannot encode TOML: {e}")))?;
    let threads = match resolved.server.threads {
        Some(_) => String::new(),
        None => format!(
            "\n# server.threads is not set: fusebox serve uses one serving thread per core \
             ({} on this machine)\n",
            resolved.server.serving_threads()
        ),
    };
    print(&format!(
        "# {}: valid. Resolved (defaults filled in, passwords redacted):\n\n{text}{threads}",
        cli.config.display()
    ))
}
