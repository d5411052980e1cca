//! `fusebox status --watch`: the status listing read again every `--interval`, until Ctrl-C
//! (exit 0). On a terminal each reading redraws the previous one in place, as `top` does; when
//! stdout is not a terminal (a pipe, a file) the readings are printed one after another, each
//! under a timestamped header, with no escape codes; with `--json`, one JSON document per
//! line. A store that cannot be read does not end the watch: the frame says why and the next
//! reading tries again. A closed pipe (`status --watch | head`) ends it quietly.

use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use fusebox::Config;

use crate::exit::Failure;
use crate::status;
use crate::Cli;

/// Shortest and longest `--interval`.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// `--interval`: a duration from 100 ms to 1 h, checked here so that the message names the
/// flag.
pub(crate) fn parse_interval(s: &str) -> Result<Duration, String> {
    let t = humantime_serde::re::humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration such as \"500ms\", \"2s\" or \"1m\""))?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&t) {
        return Err(format!(
            "{} is out of range: --interval takes 100ms to 1h",
            humantime_serde::re::humantime::format_duration(t)
        ));
    }
    Ok(t)
}

/// Runs the watch until Ctrl-C (or a closed stdout).
pub(crate) async fn run(
    cli: &Cli,
    config: Config,
    name: Option<&str>,
    every: Duration,
) -> Result<(), Failure> {
    let mut screen = Screen {
        terminal: std::io::stdout().is_terminal() && !cli.json,
        drawn: false,
    };
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    let coordinator = tokio::select! {
        _ = &mut stop => return Ok(()),
        c = status::connect(&config) => c?,
    };
    let every_text = humantime_serde::re::humantime::format_duration(every).to_string();
    loop {
        let reading = tokio::select! {
            _ = &mut stop => break,
            r = status::read(cli, &config, coordinator.as_ref(), name) => r,
        };
        let body = match reading {
            Ok(frame) => frame.render(true)?,
            // The store could not be read: say so, and try again at the next reading.
            Err(f) if f.is_store() => {
                if cli.json {
                    format!("{}\n", f.json())
                } else {
                    format!(
                        "fusebox: {} (reading again every {every_text})\n",
                        f.message()
                    )
                }
            }
            Err(f) => return Err(f),
        };
        let at = humantime_serde::re::humantime::format_rfc3339_seconds(SystemTime::now());
        let header = (!cli.json)
            .then(|| format!("fusebox status at {at}, every {every_text} (Ctrl-C to quit)\n\n"));
        if !screen.show(header.as_deref(), &body)? {
            return Ok(());
        }
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    // Ctrl-C: the last frame stays on the screen; the shell prompt starts on a line of its own.
    if screen.terminal && screen.drawn {
        let _ = screen.write("\n");
    }
    Ok(())
}

/// Where the frames go.
struct Screen {
    /// Redraw in place (stdout is a terminal and the output is text).
    terminal: bool,
    drawn: bool,
}

impl Screen {
    /// Shows one frame. `false`: stdout was closed (a pipe whose reader left).
    fn show(&mut self, header: Option<&str>, body: &str) -> Result<bool, Failure> {
        let text = if self.terminal {
            // Cursor home, each line followed by erase-to-end-of-line, then erase the rest of
            // the screen: the new frame overwrites the old one without a blank flash.
            let mut t = String::from("\x1b[H");
            for line in header.unwrap_or("").lines().chain(body.lines()) {
                t.push_str(line);
                t.push_str("\x1b[K\n");
            }
            t.push_str("\x1b[J");
            if !self.drawn {
                t.insert_str(0, "\x1b[2J");
            }
            t
        } else {
            let mut t = String::new();
            if self.drawn && header.is_some() {
                t.push('\n');
            }
            t.push_str(header.unwrap_or(""));
            t.push_str(body);
            t
        };
        self.drawn = true;
        self.write(&text)
    }

    fn write(&self, text: &str) -> Result<bool, Failure> {
        let mut stdout = std::io::stdout().lock();
        match stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(Failure::internal(format!("cannot write to stdout: {e}"))),
        }
    }
}
