//! The external programs some tests drive as real processes: nginx (the load balancer of the
//! fleet test), docker-compose (checks docker-compose.yml) and a Python with the official
//! `anthropic` SDK (the SDK test).
//!
//! Each is found through the variable `.ci/run` exports, else where a developer's machine
//! usually has it. A missing tool fails the test with the line that installs it: these tests
//! never skip, in CI or locally.
//!
//! * `FUSEBOX_TEST_NGINX` — the nginx binary (default: `nginx` on `PATH`, else `/usr/sbin/nginx`).
//! * `FUSEBOX_TEST_DOCKER_COMPOSE` — the compose command, e.g. `docker-compose` or
//!   `docker compose` (default: `docker-compose` on `PATH`, else `docker compose`).
//! * `FUSEBOX_TEST_PYTHON` — a Python that can `import anthropic` (default: the venv `.ci/run`
//!   creates, `$HOME/.cache/fusebox/venv/bin/python`, else `python3` on `PATH`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// How `.ci/run` installs the tools (Debian), quoted when one is missing.
const INSTALL_ALL: &str = "`bash .ci/run` installs every tool the tests need (as root, on Debian)";

/// A program with the arguments that come before a test's own (`docker compose` is `docker`
/// with `compose` first).
#[derive(Debug, Clone)]
pub struct Tool {
    /// The executable.
    pub program: PathBuf,
    /// Arguments put in front of every call.
    pub prefix: Vec<String>,
}

impl Tool {
    fn parse(spec: &str) -> Option<Tool> {
        let mut words = spec.split_whitespace();
        let program = PathBuf::from(words.next()?);
        Some(Tool {
            program,
            prefix: words.map(str::to_owned).collect(),
        })
    }

    /// A `Command` for this tool with its prefix arguments.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.prefix);
        command
    }

    /// Whether `self args...` runs and exits 0 (output discarded).
    fn runs(&self, args: &[&str]) -> bool {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// How to show it in messages.
    pub fn describe(&self) -> String {
        let mut text = self.program.display().to_string();
        for arg in &self.prefix {
            text.push(' ');
            text.push_str(arg);
        }
        text
    }
}

fn from_env(var: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Fails the test: `what` is missing, with how to install it.
fn missing(what: &str, var: &str, tried: &[String], install: &str) -> ! {
    let ci = if std::env::var("CI").is_ok_and(|v| v == "true") {
        " (CI=true: .ci/run should have installed it)"
    } else {
        ""
    };
    panic!(
        "this test needs {what}, which was not found{ci}.\n  tried: {}\n  install: {install}\n  \
         or set {var} to it; {INSTALL_ALL}",
        tried.join(", ")
    )
}

/// The nginx binary; fails the test when there is none.
pub fn nginx() -> Tool {
    let mut tried = Vec::new();
    let candidates: Vec<String> = match from_env("FUSEBOX_TEST_NGINX") {
        Some(v) => vec![v],
        None => vec!["nginx".to_owned(), "/usr/sbin/nginx".to_owned()],
    };
    for candidate in candidates {
        if let Some(tool) = Tool::parse(&candidate) {
            if tool.runs(&["-v"]) {
                return tool;
            }
        }
        tried.push(format!("{candidate} -v"));
    }
    missing(
        "nginx",
        "FUSEBOX_TEST_NGINX",
        &tried,
        "apt-get install -y nginx-light",
    )
}

/// The compose command (`docker-compose` or `docker compose`); fails the test when there is
/// none. Only `config` is used: no Docker engine is needed.
pub fn docker_compose() -> Tool {
    let mut tried = Vec::new();
    let candidates: Vec<String> = match from_env("FUSEBOX_TEST_DOCKER_COMPOSE") {
        Some(v) => vec![v],
        None => vec!["docker-compose".to_owned(), "docker compose".to_owned()],
    };
    for candidate in candidates {
        if let Some(tool) = Tool::parse(&candidate) {
            if tool.runs(&["version"]) {
                return tool;
            }
        }
        tried.push(format!("{candidate} version"));
    }
    missing(
        "docker-compose",
        "FUSEBOX_TEST_DOCKER_COMPOSE",
        &tried,
        "apt-get install -y docker-compose",
    )
}

/// The venv `.ci/run` creates for the SDK test.
pub fn default_venv() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/fusebox/venv")
}

/// A Python that can `import anthropic`; fails the test when there is none.
pub fn python_with_anthropic() -> Tool {
    let venv = default_venv();
    let mut tried = Vec::new();
    let candidates: Vec<String> = match from_env("FUSEBOX_TEST_PYTHON") {
        Some(v) => vec![v],
        None => vec![
            venv.join("bin/python").display().to_string(),
            "python3".to_owned(),
        ],
    };
    for candidate in candidates {
        if let Some(tool) = Tool::parse(&candidate) {
            if tool.runs(&["-c", "import anthropic"]) {
                return tool;
            }
        }
        tried.push(format!("{candidate} -c 'import anthropic'"));
    }
    let venv = venv.display();
    missing(
        "Python with the official `anthropic` SDK",
        "FUSEBOX_TEST_PYTHON",
        &tried,
        &format!(
            "python3 -m venv {venv} && {venv}/bin/pip install anthropic \
             (Debian: apt-get install -y python3-venv first)"
        ),
    )
}
